"""The lm-evaluation-harness (0.4) model type ``dart``: :class:`DARTLM`.

:class:`DARTLM` is lm-eval's own HF model class (``HFLM``) with a DART handle attached. Only the
log-likelihood path is replaced, to keep the masks honest and cheap:

* masks come from the context only (a dense tracing forward of the context), never from a
  continuation;
* requests that share a context are grouped: each context is computed once, keeping its KV
  cache, and all continuations of a batch of contexts are then computed in one forward of
  their own tokens over that cache (repeated once per continuation, each row under its
  context's masks); GRIFFIN's "class mode". The context itself is computed under its masks
  (``context='masked'``, the default: a second forward after the trace) or dense
  (``context='dense'``: the trace is the context's computation, one forward; the first
  continuation token is then predicted by the dense model, so single-token answers such as
  MMLU's letters or BoolQ's yes/no score as dense);
* a batch holds several contexts with per-sequence masks (``batch_policy='per_sequence'``).

``generate_until`` is HFLM's: ``model.generate`` with the handle's hooks, i.e. DART's full
schedule (trace the prompt, masks, drift checks, re-trace) per sequence. Rolling
log-likelihood (perplexity tasks) goes through the same grouped path, so a window's masks come
from its preceding tokens; use ``dart eval ppl`` for the project's perplexity protocol.

Every answered request keeps the sparsity it ran under (:attr:`DARTLM.request_sparsity`, keyed
by :func:`request_key` of its arguments). With ``answers=FILE`` each answer is appended to a
JSON-lines file together with that sparsity as soon as it is computed, and a request found
there is answered from it: an interrupted run recomputes nothing it finished, and a resumed
answer reports the sparsity it was computed under (lm-eval's own request cache keeps the
answer only).

Importing this module imports lm-eval and registers the model type ``dart``; ``import dart``
registers it lazily (:mod:`dart.lmeval.registration`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..assets.data import load_text
from ..core.api import DARTHandle
from ..core.config import DARTConfig
from ..core.methods import get_method
from ..evaluate.arms import Arm, arm_config, attach_arm
from ..evaluate.perplexity import accepts_logits_to_keep, tokenize_prefix
from ..evaluate.store import RecordStore
from ..evaluate.stream import weight_bytes
from ..options import ArmOptions
from ..runtime.loading import load_model
from .registration import MODEL_NAME
from .report import SPARSITY_KEYS

__all__ = ["CONTEXT_PHASES", "DARTLM", "SPARSITY_KEYS", "request_key"]

log = logging.getLogger("dart.lmeval")

# How a pruned arm computes a request's context: under the masks built from it (the context
# is traced, then computed again under its masks) or dense (its tracing forward is its
# computation, GRIFFIN's "class mode": one forward, but the first continuation token is then
# predicted by the dense model, so single-token answers score as dense).
CONTEXT_PHASES = ("masked", "dense")
# The defaults of the model arguments are those every command shares (dart.options).
_SHARED = ArmOptions()
_DEFAULT_METHOD = next(f.default for f in dataclasses.fields(DARTConfig) if f.name == "method")
_DENSE = dict.fromkeys(SPARSITY_KEYS, 0.0)


def request_key(args: Sequence[Any]) -> str:
    """The identity of an lm-eval request: sha256 of its arguments (``Instance.args``: context
    and continuation, context and generation options, or the rolling string) as JSON. The
    arguments tell the request type apart, so the type is not part of the key."""
    text = json.dumps(list(args), sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@register_model(MODEL_NAME)
class DARTLM(HFLM):
    """HFLM with a DART arm attached: ``method`` (dense, static, griffin, random, dart,
    dart-nodrift) at ``total_prune``; ``pretrained`` is a :func:`dart.load_model` name or folder
    (or a loaded model, with ``tokenizer``). ``dart_config``: a DARTConfig YAML/JSON file (or
    its dict) whose fields override the defaults (the arm's method and sparsity win). The
    defaults of the model, sparsity, backend, weights and seed are the options every command
    shares (:class:`dart.options.ArmOptions`).
    ``answers``: a ``.jsonl`` file of answered requests with their sparsity, read first and
    appended to as requests are answered (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | torch.nn.Module = _SHARED.model,
        method: str = _DEFAULT_METHOD,
        total_prune: float = _SHARED.total_prune[0],
        backend: str = _SHARED.backend,
        dtype: str = "float32",
        device: str = "cpu",
        tokenizer: Any = None,
        weights: str = _SHARED.weights,
        dart_config: str | dict | None = None,
        release_step: int | None = None,
        calibration: str = "wiki",
        calibration_tokens: int = 512,
        seed: int = _SHARED.seed,
        batch_size: int | str = 1,
        context: str = "masked",
        answers: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if context not in CONTEXT_PHASES:
            raise ValueError(f"context={context!r}: expected one of {', '.join(CONTEXT_PHASES)}")
        if answers is not None and not str(answers).endswith(".jsonl"):
            raise ValueError(f"answers={str(answers)!r}: expected a .jsonl file")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            log.warning("device %r is not available here: using the CPU", device)
            device = "cpu"  # lm-eval's command line asks for cuda unless told otherwise
        if isinstance(pretrained, str):
            model, tokenizer = load_model(pretrained, dtype=dtype, device=device, weights=weights)
        else:
            model = pretrained
            if tokenizer is None:
                raise ValueError("a loaded model needs its tokenizer: DARTLM(model, tokenizer=...)")
        kwargs.pop("device", None)
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs
        )
        rs = None if release_step in (None, "", "None") else int(release_step)
        prunes = get_method(method).prunes
        self.arm = Arm(method, float(total_prune) if prunes else 0.0, rs)
        overrides = dart_config
        if isinstance(dart_config, str):
            overrides = DARTConfig.load(dart_config).to_dict()
        self.handle: DARTHandle | None = None
        if prunes:
            cfg = arm_config(self.arm, dict(overrides or {}), backend=backend, seed=int(seed))
            cal = None
            if get_method(cfg.method).needs_calibration:
                text = load_text(calibration, split="calibration")
                cal = tokenize_prefix(tokenizer, text, int(calibration_tokens))[None]
            self.handle = attach_arm(model, cfg, cal)
        self._token_bytes, self._neuron_bytes = weight_bytes(model, self.handle)
        self.sparsity_log: list[dict[str, float]] = []  # one entry per batch of contexts
        # request_key -> the sparsity its answer was computed under (answered or read back)
        self.request_sparsity: dict[str, dict[str, float]] = {}
        self.context = context
        self._last_only = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        self._answers: dict[str, dict[str, Any]] = {}
        self._store: RecordStore | None = None
        if answers is not None:
            path = Path(answers)
            self._store = RecordStore(path.parent, stem=path.name[: -len(".jsonl")])
            self._answers = {r["id"]: r for r in self._store.records(*self.arm.key)}

    def close(self) -> None:
        """Detach the arm (the model is restored exactly)."""
        if self.handle is not None:
            self.handle.detach()
            self.handle = None

    # -- requests: answered from the answers file, else computed and appended to it ----------
    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        # computed answers are saved per batch by _loglikelihood_tokens (crash granularity)
        return self._answered(
            requests, lambda rest: super(DARTLM, self).loglikelihood(rest, disable_tqdm), tuple
        )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        def compute(rest):
            out = []
            for req in rest:  # one at a time: a request's windows give its sparsity
                start, args = len(self.sparsity_log), copy.deepcopy(req.args)
                (ll,) = super(DARTLM, self).loglikelihood_rolling([req], disable_tqdm=True)
                self._save([(args, ll, _mean_sparsity(self.sparsity_log[start:]))])
                out.append(ll)
            return out

        return self._answered(requests, compute, float)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        def compute(rest):
            out = []
            for req in rest:  # one at a time: the counters of its generation give its sparsity
                if self.handle is not None:
                    self.handle.controller.reset_stats()
                args = copy.deepcopy(req.args)  # its key as asked, whatever generation does
                (text,) = super(DARTLM, self).generate_until([req], disable_tqdm=True)
                self._save([(args, text, self._generation_sparsity())])
                out.append(text)
            return out

        return self._answered(requests, compute, str)

    def _answered(self, requests, compute: Callable[[list], list], kind: type) -> list:
        """Answers of ``requests``: those in the answers file read back (with their
        sparsity), the rest from ``compute`` (which records theirs)."""
        results: list[Any] = [None] * len(requests)
        rest = []
        for i, req in enumerate(requests):
            key = request_key(req.args)
            rec = self._answers.get(key)
            if rec is None:
                rest.append(i)
                continue
            results[i] = kind(rec["answer"])  # JSON gave a list for (ll, greedy)
            self.request_sparsity[key] = {k: float(rec[k]) for k in SPARSITY_KEYS}
            self.cache_hook.add_partial(_request_type(req), req.args, results[i])
        if len(rest) < len(requests):
            log.info("%d of %d requests answered from %s", len(requests) - len(rest),
                     len(requests), self._store and self._store.path())  # fmt: skip
        if rest:
            for i, answer in zip(rest, compute([requests[i] for i in rest]), strict=True):
                results[i] = answer
        return results

    def _save(self, answered: list[tuple[Sequence[Any], Any, dict[str, float]]]) -> None:
        """Record (args, answer, sparsity) of computed requests; append them to the answers
        file (one fsynced write per call)."""
        records = []
        for args, answer, sparsity in answered:
            key = request_key(args)
            self.request_sparsity[key] = sparsity
            rec = {**self.arm.to_dict(), "id": key, "answer": answer, **sparsity}
            self._answers[key] = rec
            records.append(rec)
        if self._store is not None:
            self._store.append(records)

    # -- the context: masks, then one forward that keeps its KV cache -------------------------
    def _run_context(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Logits after each row's context ([B, V]) and its KV cache. A traced method first
        builds each row's masks from its context (a dense tracing forward); the context is then
        computed under them (``context='masked'``), or that tracing forward is the context's
        own computation (``context='dense'``: one forward, GRIFFIN's class mode). The masks
        stay held for the continuations."""
        h = self.handle
        if h is None:
            return self._forward(ids, mask, cache=True)
        c = h.controller
        if h.method.needs_calibration:
            c.begin(ids.shape[0], ids.device)  # the calibrated masks, every row
        elif self.context == "dense":
            out = self._forward(ids, mask, cache=True)  # trace = the context's computation
        else:
            self._forward(ids, mask, cache=False)  # trace the context: its masks
        c.select_traced()
        self.sparsity_log.append(self._sparsity())
        if self.context == "masked":
            with h.hold():
                return self._forward(ids, mask, cache=True)
        if h.method.needs_calibration:
            with h.hold(), _dense_ffns(c):
                return self._forward(ids, mask, cache=True)
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: bool):
        """The last position's logits ([B, V], float) and the KV cache (None without)."""
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=cache, **self._last_only)
        return out.logits[:, -1].float(), out.past_key_values if cache else None

    def _sparsity(self) -> dict[str, float]:
        """FFN neurons skipped and per-token weight bytes skipped under the current masks."""
        c = self.handle.controller
        counts = c.counts if c.counts is not None else c.widths
        skipped = [w - k for w, k in zip(c.widths, counts, strict=True)]
        saved = sum(s * b for s, b in zip(skipped, self._neuron_bytes, strict=True))
        return {
            "ffn_sparsity": sum(skipped) / sum(c.widths),
            "weight_bytes_sparsity": saved / self._token_bytes,
        }

    def _generation_sparsity(self) -> dict[str, float]:
        """The FFN neurons not computed over a generation's decode tokens (re-trace passes
        count as dense) and the weight bytes they stand for."""
        if self.handle is None:
            return dict(_DENSE)
        stats = self.handle.stats()
        per_layer = stats["effective_sparsity_per_layer"]
        saved = sum(f * w * b for f, w, b in zip(per_layer, stats["widths"], self._neuron_bytes,
                                                 strict=True))  # fmt: skip
        return {
            "ffn_sparsity": float(stats["effective_sparsity"]),
            "weight_bytes_sparsity": saved / self._token_bytes,
        }

    # -- log-likelihood -------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Score (context, continuation) requests; one trace per distinct context."""
        from tqdm.auto import tqdm

        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            groups[tuple(ctx)].append(i)
        contexts = sorted(groups, key=len, reverse=True)  # similar lengths share a batch
        batch = int(override_bs or self.batch_size or 1)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="dart ll")
        for start in range(0, len(contexts), batch):
            chunk = contexts[start : start + batch]
            conts = [[requests[i][2] for i in groups[c]] for c in chunk]
            scores = self._score_contexts([list(c) for c in chunk], conts)
            # every context of the batch ran under the masks whose sparsity was just logged
            sparsity = self.sparsity_log[-1] if self.handle is not None else dict(_DENSE)
            answered = []
            for c, row in zip(chunk, scores, strict=True):
                for i, answer in zip(groups[c], row, strict=True):
                    results[i] = answer
                    if requests[i][0] is not None:  # rolling windows carry no request
                        answered.append((requests[i][0], answer, sparsity))
                    bar.update(1)
            self._save(answered)  # before lm-eval's cache hears of them
            for args, answer, _ in answered:
                self.cache_hook.add_partial("loglikelihood", args, answer)
        bar.close()
        return results

    @torch.no_grad()
    def _score_contexts(
        self, contexts: list[list[int]], continuations: list[list[list[int]]]
    ) -> list[list[tuple[float, bool]]]:
        """Per context: (sum log p(continuation), greedy?) of each of its continuations.

        Each context is computed once; then all continuations of the batch are computed in one
        forward of their own tokens over the context's cache, repeated once per continuation
        (and, for a pruned arm, under its context's masks)."""
        longest = max(len(c) for row in continuations for c in row)
        keep = max(self.max_length - longest + 1, 1)  # left-truncate contexts that do not fit
        contexts = [c[-keep:] for c in contexts]
        ids, mask = self._left_pad(contexts)
        first, cache = self._run_context(ids, mask)
        owner = [b for b, row in enumerate(continuations) for _ in row]
        flat = [c for row in continuations for c in row]
        rest = self._continue(flat, torch.tensor(owner, device=self.device), cache, mask)
        scores: list[list[tuple[float, bool]]] = [[] for _ in contexts]
        for r, (b, cont) in enumerate(zip(owner, flat, strict=True)):
            logits = torch.cat([first[b : b + 1], rest[r, : len(cont) - 1]], 0)
            scores[b].append(_score(logits, cont))
        return scores

    def _continue(self, conts, owner: torch.Tensor, cache, ctx_mask: torch.Tensor) -> torch.Tensor:
        """Logits after each continuation's tokens but its last ([R, W, V]): one forward of
        every continuation over its context's cache (row ``r`` continues context
        ``owner[r]``, under that context's masks)."""
        width = max(len(c) - 1 for c in conts)
        if width == 0:  # single-token continuations: the context's last logits say it all
            return torch.empty(len(conts), 0, self.model.config.vocab_size, device=self.device)
        paused = contextlib.nullcontext()
        if self.handle is not None:
            self.handle.controller.repeat_rows(owner)
            paused = self.handle.controller.paused(len(conts))  # no drift monitor, no stats
        cache.batch_select_indices(owner)
        pad = self.tokenizer.pad_token_id or 0
        rows = [c[:-1] for c in conts]
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        real = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        mask = torch.cat([ctx_mask[owner], real.to(ctx_mask)], 1)
        with paused:
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        return out.logits.float()

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        ids = [[pad] * (width - len(r)) + r for r in rows]
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return (
            torch.tensor(ids, device=self.device),
            torch.tensor(mask, device=self.device),
        )


def _request_type(req: Any) -> str:
    return str(getattr(req, "request_type", "loglikelihood"))


def _mean_sparsity(values: list[dict[str, float]]) -> dict[str, float]:
    if not values:
        return dict(_DENSE)
    return {k: sum(v[k] for v in values) / len(values) for k in SPARSITY_KEYS}


def _score(logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """``logits[j]`` predicts ``cont[j]``: (sum of log-probabilities, all greedy)."""
    lp = F.log_softmax(logits, dim=-1)
    target = torch.tensor(cont, device=lp.device)
    total = float(lp.gather(1, target[:, None]).sum())
    return total, bool((lp.argmax(-1) == target).all())


@contextlib.contextmanager
def _dense_ffns(controller):
    """Every FFN of ``controller`` computes densely inside (its masks stay installed)."""
    with contextlib.ExitStack() as stack:
        for layer in controller.layers:
            stack.enter_context(layer.routed())
        yield
