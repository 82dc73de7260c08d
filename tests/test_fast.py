"""The compiled static-cache generation loop (dart.runtime.fast) against HF `generate`."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from tiny_models import force_drift, tiny_model

import dart
from dart import DARTConfig
from dart.runtime.fast import FastGenerator


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


@pytest.mark.parametrize(
    "backend,compile_trace", [("gathered", True), ("compact", True), ("gathered", False)]
)
def test_compiled_loop_matches_hf_generate_with_retraces(backend, compile_trace):
    """Look-back re-traces of 8 tokens (one row, then both, then the other): the compiled
    R-token graph gives HF generate's tokens and is compiled once for every event."""
    model = tiny_model("llama")
    ids, mask = _batch()
    cfg = DARTConfig(
        layer_topk="all:0.5",
        backend=backend,
        drift={"window": 4, "retrace_tokens": 8, "retrace": "lookback"},
    )
    events = {11: [1], 15: [0, 1], 23: [0]}
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    ref_events = handle.stats()["drift_events"]
    handle.detach()
    assert len(ref_events) == 4

    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fast = FastGenerator(model, handle, max_len=64, compile=False, compile_trace=compile_trace)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    if compile_trace:
        fast.retrace_fn = torch.compile(fast._retrace_step, backend=counter, fullgraph=True)
    for _ in range(2):  # a second generation reuses the cache and the compiled step
        handle.reset()
        result = fast.generate(ids, mask, max_new_tokens=30)
        assert torch.equal(result.tokens, ref)
        assert result.stats["drift_events"] == ref_events
        assert result.stats["retraced_tokens"] == 8 * len(ref_events)
        # re-trace windows are timed apart from the sparse steps
        assert 1 <= result.trace_steps < result.decode_steps and result.trace_seconds > 0
    # one graph for sparse steps (+ one for re-trace steps); re-selections and further
    # re-traces never recompile
    assert counter.frame_count == (2 if compile_trace else 1)
    handle.detach()


def test_dense_loop_matches_hf_generate_and_stops_at_eos():
    model = tiny_model("llama")
    ids, mask = _batch()
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    fast = FastGenerator(model, None, max_len=64)
    assert torch.equal(fast.generate(ids, mask, max_new_tokens=20).tokens, ref)
    cache = fast.cache_tensors()  # keys and values of the 3 layers, [B, kv heads, max_len, d]
    assert len(cache) == 6 and all(t.shape == (2, 2, 64, 8) for t in cache)
    eos = int(ref[0, 5])
    out = fast.generate(ids, mask, max_new_tokens=20, eos_token_id=eos).tokens
    row = out[0].tolist()
    assert row[: row.index(eos) + 1] == ref[0, : row.index(eos) + 1].tolist()
    assert all(t == eos for t in row[row.index(eos) :])


def test_sampling_is_seeded_and_length_is_checked():
    model = tiny_model("llama")
    ids, mask = _batch()
    handle = dart.attach(model, DARTConfig())
    fast = FastGenerator(model, handle, max_len=40, compile=False)
    a = fast.generate(ids, mask, 10, do_sample=True, generator=torch.Generator().manual_seed(1))
    b = fast.generate(ids, mask, 10, do_sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="max_len"):
        fast.generate(ids, mask, 40)
    handle.detach()


def test_auto_budgets_of_new_prompts_reuse_the_compiled_step():
    """`all:auto` gives every prompt its own per-layer counts; the step must not recompile."""
    model = tiny_model("llama", layers=8)  # enough layers for budgets to differ by prompt
    for backend in ("gathered", "compact"):
        handle = dart.attach(model, DARTConfig(total_prune=0.5, backend=backend))
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounter()
        fast = FastGenerator(model, handle, max_len=48, compile=False)
        fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
        counts = []
        for seed in range(4):
            ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(seed))
            handle.reset()
            result = fast.generate(ids, torch.ones_like(ids), max_new_tokens=12)
            counts.append(tuple(result.stats["keep_counts"]))
            assert torch.equal(result.tokens, _eager_tokens(model, handle, ids, 12))
        assert len(set(counts)) > 1, "the test needs prompts with different budgets"
        assert counter.frame_count <= 2  # the sparse step (+ the re-trace step), once each
        handle.detach()


def _eager_tokens(model, handle, ids, new):
    """HF greedy `generate` with the handle following through its hooks (as without a loop)."""
    handle.reset()
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :]


def test_generate_and_the_fast_loop_take_turns_on_one_handle():
    """The loop steps the controller itself only while it runs: HF `generate`, the loop and
    HF `generate` again on one handle each give the tokens of a fresh handle."""
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 4})
    prompts = [
        torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)
    ]

    def fresh(run):
        handle = dart.attach(model, cfg)
        try:
            return run(handle)
        finally:
            handle.detach()

    def fast(handle, ids):
        return (
            FastGenerator(model, handle, max_len=48, compile=False)
            .generate(ids, max_new_tokens=16)
            .tokens
        )

    expected = [
        fresh(lambda h: _eager_tokens(model, h, prompts[0], 16)),
        fresh(lambda h: fast(h, prompts[1])),
        fresh(lambda h: _eager_tokens(model, h, prompts[2], 16)),
    ]
    handle = dart.attach(model, cfg)
    loop = FastGenerator(model, handle, max_len=48, compile=False)
    assert torch.equal(_eager_tokens(model, handle, prompts[0], 16), expected[0])
    assert torch.equal(loop.generate(prompts[1], max_new_tokens=16).tokens, expected[1])
    assert torch.equal(_eager_tokens(model, handle, prompts[2], 16), expected[2])
    handle.detach()


def test_the_recompile_limit_is_raised_only_while_the_loop_runs():
    limit = torch._dynamo.config.recompile_limit
    model = tiny_model("llama")
    fast = FastGenerator(model, None, max_len=32)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    fast.generate(ids, max_new_tokens=4)
    assert torch._dynamo.config.recompile_limit == limit


def test_bad_token_counts_and_a_detached_handle_are_refused():
    """max_new_tokens < 1 is refused by name (was IndexError / "negative dimension"); after
    handle.detach() the generator refuses instead of running dense and returning the handle's
    stale stats (issue 24.9)."""
    model = tiny_model("llama")
    ids, mask = _batch()
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"enabled": False}))
    fast = FastGenerator(model, handle, max_len=64, compile=False)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_new_tokens must be at least 1, got {bad}"):
            fast.generate(ids, mask, max_new_tokens=bad)
    assert fast.generate(ids, mask, max_new_tokens=2).tokens.shape == (2, 2)
    handle.detach()
    with pytest.raises(RuntimeError, match="detached"):
        fast.generate(ids, mask, max_new_tokens=2)
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="handle is attached to another model"):
        FastGenerator(other, dart.attach(model, DARTConfig(backend="masked")), compile=False)


def _eos_of_row0(model, cfg, ids, mask) -> tuple[int, int]:
    """`(token, step)`: a token DART's row 0 first emits at `step` >= 2 and row 1 never emits
    in 30 steps (with it as EOS, row 0 ends early and row 1 runs on)."""
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, {})
    tokens = FastGenerator(model, handle, max_len=64, compile=False).generate(ids, mask, 30).tokens
    handle.detach()
    row0, row1 = tokens.tolist()
    for step in range(2, 8):
        if row0[step] not in row0[:step] + row1:
            return row0[step], step
    pytest.skip("row 0 of this model emits no token of its own early")


@pytest.mark.parametrize("loop", ["fast", "fast_compiled", "hf_generate"])
def test_a_finished_row_never_drives_a_retrace(loop):
    """Row 0 ends (EOS at an early step) while row 1 runs on: drift that fires on row 0 afterwards
    is ignored (no re-trace of a finished row), row 1's is served."""
    model = tiny_model("llama")
    ids, mask = _batch()
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 4, "retrace_tokens": 8})
    eos, end = _eos_of_row0(model, cfg, ids, mask)
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, {11: [0, 1], 19: [0]})
    if loop.startswith("fast"):
        fast = FastGenerator(model, handle, max_len=64, compile=False)
        if loop == "fast_compiled":  # a finished row's padding tokens never recompile the step
            torch._dynamo.reset()
            counter = torch._dynamo.testing.CompileCounter()
            fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
        tokens = fast.generate(ids, mask, 30, eos_token_id=eos).tokens
        if loop == "fast_compiled":
            assert counter.frame_count == 1
    else:
        model.generation_config.eos_token_id = eos
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=eos
        )
        tokens = out[:, ids.shape[1] :]
    stats = handle.stats()
    handle.detach()
    assert int(tokens[0, end]) == eos and eos not in tokens[1].tolist()
    assert stats["drift_events"] == [{"step": 11, "row": 1}]
    assert stats["retraced_tokens"] == 8


def test_finished_rows_are_checked_and_cleared_by_a_new_sequence():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5"))
    c = handle.controller
    c.begin(2, "cpu")
    with pytest.raises(ValueError, match=r"rows: shape \(3,\) is not \[B\] = \[2\]"):
        c.finish_rows(torch.zeros(3, dtype=torch.bool))
    c.finish_rows(torch.tensor([True, False]))
    c.before_forward(None, tokens=3)
    assert c.valid.tolist() == [[False] * 3, [True] * 3]
    c.begin(2, "cpu")
    c.before_forward(None)
    assert c.valid is None
    handle.detach()


@pytest.mark.parametrize("then_eos", [False, True])
def test_one_eos_inside_teacher_forced_text_does_not_end_a_row(then_eos):
    """Fed token by token, EOS followed by other text keeps the row live (its drift still
    fires); EOS followed by EOS (HF `generate`'s padding of a finished row) ends it."""
    model = tiny_model("llama")
    model.generation_config.eos_token_id = eos = 2
    model.generation_config.pad_token_id = None
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    force_drift(handle.controller, {7: [0]})  # polls come after odd passes (window 2)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    feed = [5, eos, eos if then_eos else 7, 9, 11, 13, 15, 17, 19]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        for token in feed:
            model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
    events = handle.stats()["drift_events"]
    handle.detach()
    assert events == ([] if then_eos else [{"step": 7, "row": 0}])
