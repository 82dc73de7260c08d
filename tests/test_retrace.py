"""DART's look-back re-trace (dart.core.retrace, the controller's re-trace, the HF forward
wrapper)."""

from __future__ import annotations

import copy
from contextlib import ExitStack

import pytest
import torch
from tiny_models import force_drift, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.config import ConfigError, DriftConfig
from dart.core.controller import Phase
from dart.core.scoring import ActivationAccumulator


def _dense_hidden(model, handle, ids, cache=None):
    """FFN hidden activations [B, T, N] per layer and the cache of a dense forward of `ids`
    (the DART modules routed to the original MLPs, the schedule paused)."""
    hidden = []

    def capture(module, args):
        x = args[0]
        hidden.append(module.act_fn(module.gate_proj(x)) * module.up_proj(x))

    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(handle.controller.paused(ids.shape[0]))
        for ffn in handle.ffns:
            stack.enter_context(ffn.routed())
            hook = ffn.original.register_forward_pre_hook(capture)
            stack.callback(hook.remove)
        out = model(ids, past_key_values=cache, use_cache=True)
    return hidden, out.past_key_values


def _kv(cache, row, span):
    return [(layer.keys[row, :, span], layer.values[row, :, span]) for layer in cache.layers]


def test_retrace_rebuilds_statistics_and_kv_from_the_last_r_tokens():
    """Row 1 fires: the re-trace pass recomputes its last R positions in one forward; its
    accumulators equal a dense trace of exactly those tokens over the same earlier cache,
    and its KV there equals that dense recompute; row 0's cache is untouched."""
    model = tiny_model("llama")
    r = 6
    cfg = DARTConfig(  # plain L2: the expected accumulators below are sqrt(sum h^2)
        layer_topk="all:0.5",
        backend="masked",
        statistic="l2",
        drift={"window": 2, "retrace_tokens": r, "retrace": "lookback"},
    )
    handle = dart.attach(model, cfg)
    c = handle.controller
    force_drift(c, {9: [1]})
    prompt, stream = random_ids(2, 8, seed=3), random_ids(2, 16, seed=4)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        for t in range(stream.shape[1]):
            if c.retrace_rows:
                assert c.retrace_rows == [1] and c.phase == [Phase.SPARSE, Phase.TRACE]
                before = copy.deepcopy(cache)
                length = cache.get_seq_length()
                out = model(stream[:, t : t + 1], past_key_values=cache, use_cache=True)
                assert out.logits.shape == (2, 1, 96)  # the caller's one token
                assert cache.get_seq_length() == length + 1
                assert c.phase == [Phase.SPARSE, Phase.SPARSE]  # new mask after the pass
                retraced = (t, before, length)
                mags = [c.acc.magnitudes(i)[1].clone() for i in range(c.num_layers)]
            else:
                model(stream[:, t : t + 1], past_key_values=cache, use_cache=True)
    t, before, length = retraced
    seq = torch.cat([prompt, stream], 1)
    window = seq[:, length + 1 - r : length + 1]  # R - 1 earlier tokens and the new one
    before_row1 = copy.deepcopy(before)
    before_row1.crop(-(r - 1))
    hidden, dense_cache = _dense_hidden(model, handle, window, before_row1)
    for i, h in enumerate(hidden):
        torch.testing.assert_close(mags[i], h[1].float().square().sum(0).sqrt())
    span = slice(length + 1 - r, length + 1)
    # the re-trace pass wrote row 1's KV densely; later passes only appended
    for (k, v), (dk, dv) in zip(_kv(cache, 1, span), _kv(dense_cache, 1, span), strict=True):
        torch.testing.assert_close(k, dk)
        torch.testing.assert_close(v, dv)
    old = slice(0, length)
    for (k, v), (bk, bv) in zip(_kv(cache, 0, old), _kv(before, 0, old), strict=True):
        assert torch.equal(k, bk) and torch.equal(v, bv)
    stats = handle.stats()
    assert stats["retraced_tokens"] == r and stats["mask_refreshes"] == 1
    # R - 1 recomputed tokens and the new one ran dense, nothing else after the prompt
    assert stats["dense_token_computations"] == r
    assert stats["dense_token_computations_per_token"] == pytest.approx(r / (2 * 16))
    handle.detach()


def test_retrace_longer_than_the_sequence_is_clamped():
    """R beyond the sequence recomputes all of it: row 1's cache then equals the unpatched
    model's, and the pass traces exactly the sequence's tokens."""
    model = tiny_model("llama")
    cfg = DARTConfig(
        layer_topk="all:0.5", backend="masked", drift={"window": 2, "retrace": "lookback"}
    )
    assert cfg.drift.retrace_tokens == 64  # the default
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, {5: [1]})
    prompt, stream = random_ids(2, 8, seed=3), random_ids(2, 6, seed=4)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        for t in range(stream.shape[1]):
            model(stream[:, t : t + 1], past_key_values=cache, use_cache=True)
    handle.detach()
    dense = model(torch.cat([prompt, stream], 1), use_cache=True).past_key_values
    span = slice(0, 14)  # the re-trace pass (the last) ran with the 14th token
    for (k, v), (dk, dv) in zip(_kv(cache, 1, span), _kv(dense, 1, span), strict=True):
        torch.testing.assert_close(k, dk)
        torch.testing.assert_close(v, dv)
    assert handle.stats()["retraced_tokens"] == 8 + 6  # the prompt and the decoded tokens


@pytest.mark.parametrize("mode", ["ffn_inputs", "lookback"])
def test_retrace_off_is_the_old_schedule(mode):
    """R = 0 (or None), in either mode: no ring, no look-back; the row traces the next
    max(masking_step, 1) single-token passes."""
    model = tiny_model("llama")
    assert DriftConfig(retrace_tokens=None).retrace_tokens == 0
    drift = {"window": 2, "retrace_tokens": 0, "retrace": mode}
    cfg = DARTConfig(layer_topk="all:0.5", masking_step=2, drift=drift)
    handle = dart.attach(model, cfg)
    c = handle.controller
    assert c.retrace_tokens == 0
    assert handle.stats()["extra_state_bytes"].get("retrace_inputs", 0) == 0
    force_drift(c, {5: [1]})
    cache = model(random_ids(2), use_cache=True).past_key_values
    nxt = torch.full((2, 1), 5)
    phases = {}
    for _ in range(8):
        length = cache.get_seq_length()
        model(nxt, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == length + 1 and not c.retrace_rows
        phases[c.step - 1] = list(c.phase)
    assert phases[5] == phases[6] == [Phase.SPARSE, Phase.TRACE]  # traced by passes 6 and 7
    assert phases[7] == [Phase.SPARSE, Phase.SPARSE]
    stats = handle.stats()
    # pass 1 traces both rows (masking_step 2), passes 6 and 7 row 1
    assert stats["retraced_tokens"] == 0 and stats["dense_token_computations"] == 2 + 2
    handle.detach()


@pytest.mark.parametrize(
    "field,value", [("retrace_tokens", -1), ("retrace_tokens", 2.5), ("retrace_blend", 1.0)]
)
def test_retrace_settings_are_validated(field, value):
    with pytest.raises(ConfigError, match=f"DriftConfig.{field}"):
        DARTConfig(drift={field: value})


def test_non_firing_row_generates_as_if_nothing_fired():
    """Row 1 re-traces mid-generation; row 0 (masks kept, its recomputed KV put back) gives
    the tokens it gives when no row fires. Up to rounding, its one pass attends to its own
    recompute of the window, which here was computed under the same mask (decoded tokens)."""
    model = tiny_model("llama")
    cfg = DARTConfig(
        layer_topk="all:0.5", backend="masked", drift={"window": 4, "retrace_tokens": 8}
    )
    ids = random_ids(2, 10, seed=5)
    runs = {}
    for fire in ({}, {19: [1]}):
        handle = dart.attach(model, cfg)
        force_drift(handle.controller, fire)
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        runs[bool(fire)] = (out[:, 10:], handle.stats())
        handle.detach()
    assert runs[True][1]["retraced_tokens"] == 8 and runs[False][1]["retraced_tokens"] == 0
    assert torch.equal(runs[True][0][0], runs[False][0][0])


def test_hf_generate_with_a_static_cache_matches_the_dynamic_cache():
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 4, "retrace_tokens": 8})
    ids = random_ids(2, 10, seed=5)
    outs = []
    for cache in ("dynamic", "static"):
        handle = dart.attach(model, cfg)
        force_drift(handle.controller, {11: [0, 1], 15: [1]})
        kwargs = {"cache_implementation": "static"} if cache == "static" else {}
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0, **kwargs)
        outs.append((out, handle.stats()["retraced_tokens"]))
        handle.detach()
    assert outs[0][1] == outs[1][1] == 3 * 8
    assert torch.equal(outs[0][0], outs[1][0])


def test_a_short_retrace_keeps_the_previous_baseline_until_it_has_min_windows():
    """R = 4 with 4-token windows gives one window (< min_windows = 2): the row keeps its old
    baseline and threshold (pending), and arms from its own windows later."""
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 4, "retrace_tokens": 4})
    handle = dart.attach(model, cfg)
    c = handle.controller
    force_drift(c, {11: [0]})
    cache = model(random_ids(1, 12), use_cache=True).past_key_values
    tau = None
    for t in range(16):
        model(torch.full((1, 1), 7 + t), past_key_values=cache, use_cache=True)
        if c.step == 12:
            tau = c.monitor.tau.clone()
            baseline = c.monitor.baseline.clone()
        if c.step == 13:  # after the re-trace pass: one window traced, still pending
            assert c.phase == [Phase.SPARSE] and bool(c.monitor.pending[0])
            assert torch.equal(c.monitor.tau, tau) and torch.equal(c.monitor.baseline, baseline)
    assert not c.monitor.pending.any() and not torch.equal(c.monitor.baseline, baseline)
    handle.detach()


def test_blend_mixes_per_token_statistics():
    acc = ActivationAccumulator([3], ema_decay=None)
    acc.reset(2)
    acc.update(0, torch.tensor([[[1.0, 2.0, 0.0]], [[3.0, 0.0, 1.0]]]))
    old = [acc.per_token(0)]
    acc.reset_rows(torch.tensor([True, False]))
    acc.update(0, torch.tensor([[[0.0, 2.0, 4.0], [0.0, 2.0, 4.0]], [[0.0] * 3] * 2]))
    acc.blend_rows(torch.tensor([True, False]), old, 0.25)
    expected = 0.25 * torch.tensor([1.0, 2.0, 0.0]) + 0.75 * torch.tensor([0.0, 2.0, 4.0])
    torch.testing.assert_close(acc.per_token(0)[0], expected)
    torch.testing.assert_close(acc.magnitudes(0)[0], expected * 2**0.5)  # two tokens
    torch.testing.assert_close(acc.per_token(0)[1], torch.tensor([3.0, 0.0, 1.0]) / 3**0.5)


def test_fast_loop_matches_hf_generate_with_clamped_retraces():
    """R = 64 beyond the sequence (12 prompt slots, one of them padding): the compiled loop's
    clamped re-traces (run eagerly) give HF generate's tokens, statistics and costs."""
    from dart.runtime.fast import FastGenerator

    model = tiny_model("llama")
    ids = random_ids(2, 12, seed=7)
    mask = torch.ones_like(ids)
    ids[0, :1], mask[0, :1] = 0, 0
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 4, "retrace": "lookback"})
    events = {7: [0], 11: [0, 1]}
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0
    )
    ref_stats = handle.stats()
    handle.detach()
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    result = FastGenerator(model, handle, max_len=40, compile=False).generate(ids, mask, 16)
    assert torch.equal(result.tokens, ref[:, 12:])
    keys = ("drift_events", "retraced_tokens", "dense_token_computations", "effective_sparsity")
    assert {k: result.stats[k] for k in keys} == {k: ref_stats[k] for k in keys}
    # pass 8 re-traces row 0's 11 real prompt tokens and 8 decoded; pass 12 both rows' all
    assert ref_stats["retraced_tokens"] == (11 + 8) + (11 + 12) + (12 + 12)
    handle.detach()
