"""Per-sequence `auto` budgets: a sequence generates the same tokens alone and in any batch.

Under `batch_policy="per_sequence"` each row's per-layer keep counts come from its own
sensitivities (padded indices `[B, kmax]` with per-row lengths in the kernels); `shared` keeps one
budget for the batch. Drift is off throughout so the budget is the only thing batch-mates could
change; prompts share one token length, so there is no padding either.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from tiny_models import NO_DRIFT, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.budget import allocate_budget, max_keep_counts
from dart.core.config import BACKENDS
from dart.core.scoring import select_topk
from dart.core.selection import top_per_row
from dart.runtime.fast import FastGenerator

STEPS = 10
PROMPTS = 4


def _model():
    return tiny_model("llama", layers=8)  # enough layers for the prompts' budgets to differ


def _config(**overrides) -> DARTConfig:
    settings = dict(total_prune=0.5, drift=NO_DRIFT) | overrides
    return DARTConfig(**settings)


def greedy(model, ids: torch.Tensor, steps: int = STEPS) -> torch.Tensor:
    """`steps` greedy tokens `[B, steps]` through the KV cache."""
    out = model(ids, use_cache=True)
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(steps - 1):
        out = model(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def run(model, cfg: DARTConfig | None, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Greedy tokens and the handle's stats of a fresh attach (None: the dense model)."""
    if cfg is None:
        return greedy(model, ids), {}
    handle = dart.attach(model, cfg)
    try:
        return greedy(model, ids), handle.stats()
    finally:
        handle.detach()


def _prompts() -> torch.Tensor:
    return random_ids(PROMPTS, 12, seed=7)


def test_dense_control_is_batch_invariant():
    """Without DART the tiny model already gives every prompt the same tokens alone and
    batched, so a difference under DART comes from DART."""
    model, ids = _model(), _prompts()
    batched, _ = run(model, None, ids)
    for b in range(PROMPTS):
        assert torch.equal(run(model, None, ids[b : b + 1])[0], batched[b : b + 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["dart", "dart-nodrift"])
def test_per_sequence_budget_is_the_rows_own(backend, method):
    model, ids = _model(), _prompts()
    cfg = _config(backend=backend, method=method)
    batched, stats = run(model, cfg, ids)
    rows = stats["keep_counts_per_row"]
    assert len(rows) == PROMPTS
    assert len({tuple(r) for r in rows}) > 1, "the test needs prompts with different budgets"
    for b in range(PROMPTS):
        alone, alone_stats = run(model, cfg, ids[b : b + 1])
        assert alone_stats["keep_counts_per_row"] == [rows[b]], f"row {b}: batch-mates moved it"
        assert torch.equal(alone, batched[b : b + 1]), f"row {b} generates differently batched"
    # accounting: each row's own neurons; keep_counts is the rows' mean per layer
    widths = stats["widths"]
    kept = sum(map(sum, rows)) / PROMPTS
    assert stats["nominal_sparsity"] == pytest.approx(1 - kept / sum(widths))
    # decode passes 1..STEPS-1 all run sparse (masks from the prompt's pass)
    assert stats["effective_sparsity"] == pytest.approx(stats["nominal_sparsity"])
    per_layer = [1 - sum(r[i] for r in rows) / (PROMPTS * n) for i, n in enumerate(widths)]
    assert stats["effective_sparsity_per_layer"] == pytest.approx(per_layer)
    assert stats["keep_counts"] == [round(sum(c) / PROMPTS) for c in zip(*rows, strict=True)]


def testtop_per_row_keeps_what_each_row_keeps_alone():
    """Row b's first lengths[b] entries are select_topk(row b, lengths[b]) (ties to the lower
    index, NaN as -inf), the padding is 0, whatever the other rows hold."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 3, (5, 40), generator=g).float()  # many ties
    scores[1, ::3] = float("nan")
    lengths = torch.tensor([0, 1, 17, 30, 30])
    idx = top_per_row(scores, 30, lengths)
    assert idx.shape == (5, 30) and idx.dtype == torch.int64
    for b, n in enumerate(lengths.tolist()):
        if n:
            assert torch.equal(idx[b, :n], select_topk(scores[b : b + 1], n)[0])
        assert not idx[b, n:].any()


def test_padded_indices_have_a_fixed_width_and_per_row_lengths():
    model, ids = _model(), _prompts()
    cfg = _config()
    handle = dart.attach(model, cfg)
    model(ids)
    kmax = max_keep_counts(handle.controller.widths, 0.5, cfg.budget)
    rows = handle.stats()["keep_counts_per_row"]
    for i, f in enumerate(handle.ffns):
        assert f.idx.shape == (PROMPTS, kmax[i])
        assert f.lengths.tolist() == [r[i] for r in rows]
        for b, n in enumerate(f.lengths.tolist()):  # the mask keeps exactly the row's own
            assert int(f.mask[b].sum()) == n
            assert torch.equal(f.mask[b, 0].nonzero().flatten(), f.idx[b, :n])
    handle.detach()


def test_shared_policy_uses_one_budget_for_the_batch():
    """`shared` aggregates the batch's sensitivities into one budget: batch-mates change it."""
    model, ids = _model(), _prompts()
    cfg = _config(batch_policy="shared")
    handle = dart.attach(model, cfg)
    batched = greedy(model, ids)
    c = handle.controller
    stats = handle.stats()
    expected = allocate_budget(c.sens.scores(), c.widths, 0.5, cfg.budget).keep_counts
    assert stats["keep_counts"] == expected and stats["keep_counts_per_row"] is None
    assert all(f.lengths is None and f.idx.dim() == 1 for f in handle.ffns)
    handle.detach()
    alone = [run(model, cfg, ids[b : b + 1]) for b in range(PROMPTS)]
    assert any(s["keep_counts"] != expected for _, s in alone), "one budget for all rows"
    assert any(not torch.equal(t, batched[b : b + 1]) for b, (t, _) in enumerate(alone))


@pytest.mark.parametrize("backend", ["gathered", "compact"])
def test_compiled_loop_takes_new_lengths_in_place(backend):
    """The compiled decode step reads the padded indices and lengths in place: new prompts
    (new per-row budgets) never recompile it, and every row's tokens are its tokens alone."""
    model = _model()
    cfg = _config(backend=backend)
    batches = [random_ids(3, 12, seed=seed) for seed in (7, 8)]
    alone = [[run(model, cfg, ids[b : b + 1])[0] for b in range(3)] for ids in batches]
    handle = dart.attach(model, cfg)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fast = FastGenerator(model, handle, max_len=32, compile=False)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    lengths = []
    for ids, own in zip(batches, alone, strict=True):
        handle.reset()
        tokens = fast.generate(ids, max_new_tokens=STEPS).tokens
        lengths.append([f.lengths.clone() for f in handle.ffns])
        assert torch.equal(torch.cat(own), tokens)
    assert any(not torch.equal(a, b) for a, b in zip(*lengths, strict=True))
    assert counter.frame_count == 1
    handle.detach()


@pytest.mark.parametrize("backend", ["masked", "gathered"])
def test_repeated_rows_keep_their_own_budgets(backend):
    """`Controller.repeat_rows` (lm-eval scores every continuation of a context in one batch)
    carries each row's own counts and lengths: a repeated row computes what its source does."""
    model, ids = _model(), _prompts()
    handle = dart.attach(model, _config(backend=backend))
    try:
        handle.prepare(ids)
        c = handle.controller
        assert len({tuple(r) for r in c.row_counts}) > 1  # the budgets really differ
        nxt = random_ids(PROMPTS, 3, seed=9)
        with handle.hold(), torch.no_grad():
            before = model(nxt, use_cache=False).logits
        order = torch.tensor([2, 0, 2, 3, 1])
        expected_counts = [c.row_counts[r] for r in order.tolist()]
        c.repeat_rows(order)
        assert c.row_counts == expected_counts
        with handle.hold(), torch.no_grad():
            after = model(nxt[order], use_cache=False).logits
        torch.testing.assert_close(after, before[order], rtol=1e-5, atol=1e-5)
    finally:
        handle.detach()
