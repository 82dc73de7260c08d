"""Sliding-window perplexity (labels of the overlap excluded, NLL summed in fp32).

Masks per window, by what the method does (:mod:`dart.core.methods`):

* unpruned (``dense``): none.
* calibrated (``static``): the calibration masks (the paper's protocol: a calibration prompt,
  then frozen).
* selecting from the prompt (``dart``, ``griffin``, ``random``): built from the window's
  already-seen part, the overlap with the previous window (``window - stride`` tokens), via
  ``handle.prepare``; the window is then scored under them with ``handle.hold()``. The first
  window has no overlap: its first quarter serves as the context (those first-quarter tokens
  are scored under masks that saw them: a small leak confined to the first window, which is
  documented rather than hidden). Masks are built once per window and not re-traced inside it
  (no drift checks under hold).
* per token (``gate``, ``input``...): the context part runs dense (``handle.prepare``), then the
  whole window under ``hold()``, every token choosing its own neurons.

Two protocols (:data:`PROTOCOLS`): ``sliding`` (above) and ``llamacpp``, llama.cpp's
``llama-perplexity -c ctx``: disjoint chunks of ``ctx`` tokens from the start of the tokenised
text; the first half of a chunk runs as the prompt (dense, masks chosen, its KV cache kept),
the second half on that cache under those masks (``hold()``), and only the second half's
predictions are scored (the targets ``chunk[ctx/2 + 1:]``, ``ctx/2 - 1`` per chunk), like
llama.cpp's ``first = n_ctx / 2``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.api import DARTHandle

__all__ = [
    "PROTOCOLS",
    "Window",
    "aggregate_perplexity",
    "llamacpp_windows",
    "perplexity",
    "score_chunk_cached",
    "score_window",
    "sliding_windows",
    "tokenize_prefix",
    "window_items",
]

FIRST_CONTEXT_FRACTION = 0.25


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the corpus; targets from position ``score_from`` (window
    coordinates) are scored; masks come from the first ``prep_len`` tokens."""

    id: str
    begin: int
    end: int
    score_from: int
    prep_len: int

    @property
    def tokens(self) -> int:
        return self.end - self.begin - self.score_from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """HF-style sliding windows: with ``stride < window`` each corpus token after the first is
    scored exactly once; with ``stride == window`` (disjoint) a window's first token, which has
    no context, is not scored."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window (got {window}, {stride})")
    if num_tokens < 2:
        raise ValueError("need at least 2 tokens")
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, num_tokens)
        length = end - begin
        trg = end - prev_end
        score_from = max(length - trg, 1)
        prep = length - trg if length - trg > 0 else max(1, int(length * FIRST_CONTEXT_FRACTION))
        out.append(Window(f"w{len(out):05d}", begin, end, score_from, prep))
        prev_end = end
        if end >= num_tokens:
            return out
        begin += stride


def llamacpp_windows(num_tokens: int, ctx: int, chunks: int | None = None) -> list[Window]:
    """llama.cpp's perplexity chunks: disjoint ``[i ctx, (i + 1) ctx)`` (a shorter tail is
    dropped), at most ``chunks`` of them; the first half is the prompt, the targets from
    ``ctx / 2 + 1`` on are scored."""
    if ctx < 4:
        raise ValueError(f"ctx: {ctx} is too small (llama.cpp's protocol needs ctx >= 4)")
    n = num_tokens // ctx
    if chunks is not None:
        if chunks < 1:
            raise ValueError(f"chunks: {chunks} is not >= 1")
        n = min(n, chunks)
    if n == 0:
        raise ValueError(f"the text has {num_tokens} tokens, fewer than one chunk of ctx={ctx}")
    half = ctx // 2
    return [Window(f"c{i:05d}", i * ctx, (i + 1) * ctx, half + 1, half) for i in range(n)]


def window_items(
    ids: Sequence[int],
    window: int,
    stride: int,
    protocol: str = "sliding",
    chunks: int | None = None,
) -> list[dict[str, Any]]:
    """The windows of ``protocol`` over token ids as items: the :class:`Window` fields and its
    ``ids`` (``sliding``: ``window``/``stride``; ``llamacpp``: ctx = ``window``, at most
    ``chunks``)."""
    ids = list(ids)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "llamacpp":
        windows = llamacpp_windows(len(ids), window, chunks)
    else:
        windows = sliding_windows(len(ids), window, stride)
    return [{**w.to_dict(), "ids": ids[w.begin : w.end]} for w in windows]


def tokenize_prefix(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    """``tokenize_corpus(tokenizer, text, max_tokens)`` without tokenising the whole text: a
    growing prefix is tokenised until it holds ``max_tokens`` plus a margin (so the cut cannot
    change the kept tokens)."""
    from ..assets.data import tokenize_corpus

    if max_tokens is None:
        return tokenize_corpus(tokenizer, text)
    chars = max(1024, 8 * max_tokens)
    while True:
        ids = tokenize_corpus(tokenizer, text[:chars])
        if ids.numel() >= max_tokens + 16 or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (skip the unused LM-head rows)."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def score_window(
    model: torch.nn.Module,
    ids: torch.Tensor,
    score_from: int,
    prep_len: int,
    handle: DARTHandle | None = None,
) -> dict[str, float]:
    """Summed NLL (fp32) and count of the targets ``ids[score_from:]`` of one window ``[1, L]``."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    method = handle.method if handle is not None else None
    prepared = method is not None and (method.selects_from_prompt or method.per_token is not None)
    keep = ids.shape[1] - score_from + 1  # logits of the scored positions only
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    if prepared:
        handle.prepare(ids[:, :prep_len])
        with handle.hold():
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    else:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    pred = logits[0, -keep:-1].float()
    nll = F.cross_entropy(pred, ids[0, score_from:], reduction="sum")
    return {"nll": float(nll), "tokens": int(ids.shape[1] - score_from)}


@torch.no_grad()
def score_chunk_cached(
    model: torch.nn.Module,
    ids: torch.Tensor,
    score_from: int,
    prep_len: int,
    handle: DARTHandle | None = None,
) -> dict[str, float]:
    """llama.cpp's protocol for one chunk ``[1, L]``: ``ids[:prep_len]`` as the prompt (the
    handle traces it dense and chooses its masks), then ``ids[prep_len:]`` on the prompt's KV
    cache under those masks (``hold()``); the targets ``ids[score_from:]`` are scored (summed
    NLL in fp32) from the logits of positions ``score_from - 1 ..``."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if not 1 <= prep_len < score_from <= ids.shape[1] - 1:
        raise ValueError(
            f"need 1 <= prep_len ({prep_len}) < score_from ({score_from}) < length ({ids.shape[1]})"
        )
    out = model(input_ids=ids[:, :prep_len], use_cache=True)
    if handle is not None:
        handle.controller.select_traced()  # masks now, whatever the masking step
    hold = handle.hold() if handle is not None else contextlib.nullcontext()
    with hold:
        rest = model(input_ids=ids[:, prep_len:], past_key_values=out.past_key_values).logits
    logits = rest[0, score_from - 1 - prep_len : -1].float()
    nll = F.cross_entropy(logits, ids[0, score_from:], reduction="sum")
    return {"nll": float(nll), "tokens": int(ids.shape[1] - score_from)}


# protocol name -> how one window is scored (the windows: window_items)
PROTOCOLS = {"sliding": score_window, "llamacpp": score_chunk_cached}


def aggregate_perplexity(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Perplexity from per-window records: exp(sum NLL / sum tokens)."""
    nll = tokens = 0.0
    n = 0
    for r in records:
        nll += r["nll"]
        tokens += r["tokens"]
        n += 1
    nll_tok = nll / tokens if tokens else float("nan")
    return {
        "perplexity": math.exp(nll_tok) if tokens else float("nan"),
        "nll_per_token": nll_tok,
        "tokens": tokens,
        "windows": n,
    }


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 512,
    stride: int = 256,
    handle: DARTHandle | None = None,
    progress: str | None = None,
) -> dict[str, float]:
    """Sliding-window perplexity of a 1-D token tensor (masks per window: see module doc)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    records = []
    windows = sliding_windows(ids.numel(), window, stride)
    for w in tqdm(windows, desc=progress, disable=progress is None, leave=False):
        records.append(score_window(model, ids[w.begin : w.end], w.score_from, w.prep_len, handle))
    return aggregate_perplexity(records)
