"""The `ffn_inputs` re-trace (dart.core.retrace.FFNInputRing, rebuild_statistics and the
controller's use of them): masks rebuilt from each layer's buffered FFN inputs at the event."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from tiny_models import force_drift, random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.config import ConfigError, DriftConfig
from dart.core.controller import Phase
from dart.core.retrace import FFNInputRing, hidden_fraction
from dart.core.scoring import select_topk
from dart.runtime.fast import FastGenerator


def test_ring_keeps_the_last_tokens_in_order_across_padding_and_long_passes():
    """Against a Python list per row: a prompt longer than the ring with left padding, then
    single tokens, one of them padding for row 0."""
    ring = FFNInputRing(tokens=4, num_layers=1)
    ring.reset(2)
    kept: list[list[torch.Tensor]] = [[], []]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[0, :2] = False  # left padding
    ring.record(0, x, valid)
    for b in range(2):
        kept[b] += [x[b, t] for t in range(7) if valid[b, t]]
    for step in range(6):
        x = torch.randn(2, 1, 3, generator=g)
        valid = torch.tensor([[step != 2], [True]])
        ring.record(0, x, valid)
        for b in range(2):
            kept[b] += [x[b, 0]] if valid[b, 0] else []
        window, v = ring.window(0, torch.tensor([0, 1]))
        for b in range(2):
            expect = torch.stack(kept[b][-4:])
            assert bool(v[b].all())
            torch.testing.assert_close(window[b], expect)


def test_ring_with_fewer_tokens_than_its_length_marks_the_rest_invalid():
    ring = FFNInputRing(tokens=5, num_layers=2)
    ring.reset(1)
    x = torch.arange(6.0).view(1, 3, 2)
    ring.record(1, x)
    window, v = ring.window(1, torch.tensor([0]))
    assert v.tolist() == [[True, True, True, False, False]]
    torch.testing.assert_close(window[0, :3], x[0])
    with pytest.raises(RuntimeError, match="layer 0"):
        ring.window(0, torch.tensor([0]))
    with pytest.raises(ValueError, match="tokens"):
        FFNInputRing(tokens=0, num_layers=1)
    assert hidden_fraction("glu") == pytest.approx(2 / 3) and hidden_fraction("mlp") == 0.5
    with pytest.raises(ValueError, match="kind"):
        hidden_fraction("moe")


def _capture_inputs(handle):
    """Every FFN input each DART module sees, per layer, in order (hooks; remove after)."""
    seen: list[list[torch.Tensor]] = [[] for _ in handle.ffns]
    hooks = [
        ffn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().clone()))
        for i, ffn in enumerate(handle.ffns)
    ]
    return seen, hooks


def test_event_rebuilds_the_mask_from_the_last_r_ffn_inputs():
    """Row 1 fires at pass 9: with no extra forward and no cache change, its statistics are
    the L2 of the FFN hidden activations of exactly its last R FFN inputs (the ones the model
    saw), its new masks the top-k of those, used from the next pass; row 0 keeps its masks."""
    model = tiny_model("llama")
    r = 6
    cfg = DARTConfig(
        layer_topk="all:0.5",
        backend="masked",
        statistic="l2",
        drift={"window": 2, "retrace_tokens": r, "retrace": "ffn_inputs"},
    )
    handle = dart.attach(model, cfg)
    c = handle.controller
    assert c.retrace_tokens == 0 and c.ring is not None  # no look-back forward wrapper
    force_drift(c, {9: [1]})
    seen, hooks = _capture_inputs(handle)
    attn: list[torch.Tensor] = []  # the drift signal: the last layer's attention output
    hooks.append(
        model.model.layers[-1].self_attn.register_forward_hook(
            lambda m, a, out: attn.append(out[0].detach().clone())
        )
    )
    prompt, stream = random_ids(2, 8, seed=3), random_ids(2, 12, seed=4)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        for t in range(stream.shape[1]):
            length = cache.get_seq_length()
            before = [layer.idx.clone() for layer in c.layers]
            model(stream[:, t : t + 1], past_key_values=cache, use_cache=True)
            assert cache.get_seq_length() == length + 1 and not c.retrace_rows
            assert c.phase == [Phase.SPARSE, Phase.SPARSE]
            if c.step == 10:  # the poll after pass 9 fired and rebuilt row 1
                mags = [c.acc.magnitudes(i).clone() for i in range(c.num_layers)]
                after = [layer.idx.clone() for layer in c.layers]
                # the new baseline: the mean signal of the same R tokens (R / w = 3 windows)
                assert not c.monitor.pending.any() and not bool(c.monitor.tracing[1])
                expect = torch.cat(attn, 1)[1, -r:].float().mean(0)
                torch.testing.assert_close(c.monitor.baseline[1, 0], expect)
                break
    for hook in hooks:
        hook.remove()
    for i, layer in enumerate(c.layers):
        x = torch.cat(seen[i], 1)[1, -r:]  # row 1's last R inputs of layer i
        mlp = layer.original
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        m = h.float().square().sum(0).sqrt()
        torch.testing.assert_close(mags[i][1], m)
        expect = select_topk(m[None], layer.keep)[0]
        assert torch.equal(after[i][1].sort().values, expect.sort().values)
        assert torch.equal(after[i][0], before[i][0])  # row 0 untouched
    stats = handle.stats()
    assert stats["retraced_tokens"] == r and stats["mask_refreshes"] == 1
    assert stats["dense_token_computations"] == pytest.approx(r * 2 / 3)
    # decode passes 1..9 of 2 rows at 32 of 64 neurons, plus the event's R x 2/3 x 64
    decode_neurons = 9 * 2 * 3 * 32 + r * 3 * 64 * 2 / 3
    assert stats["effective_sparsity"] == pytest.approx(1 - decode_neurons / (9 * 2 * 3 * 64))
    # FFN inputs of 3 layers and the signal of 1 watched layer, [B, R + 1, d] fp32 + counts
    assert stats["extra_state_bytes"]["retrace_inputs"] == 4 * (2 * (r + 1) * 32 * 4 + 2 * 8)
    handle.detach()


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_plain_mlp_families_rebuild_from_their_inputs(family):
    """Two-matrix FFNs (OPT flattens tokens to [B*T, d] before its FFN): the statistics are
    those of the last R inputs, and the work counted is half an FFN per token."""
    model = tiny_model(family)
    r = 5
    cfg = DARTConfig(
        layer_topk="all:0.5",
        backend="masked",
        statistic="l2",
        drift={"window": 2, "retrace_tokens": r, "retrace": "ffn_inputs"},
    )
    handle = dart.attach(model, cfg)
    c = handle.controller
    force_drift(c, {7: [0]})
    seen, hooks = _capture_inputs(handle)
    prompt, stream = random_ids(2, 6, seed=3), random_ids(2, 8, seed=4)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).past_key_values
        for t in range(stream.shape[1]):
            model(stream[:, t : t + 1], past_key_values=cache, use_cache=True)
            if c.step == 8:
                mags = [c.acc.magnitudes(i).clone() for i in range(c.num_layers)]
                break
    for hook in hooks:
        hook.remove()
    for i, layer in enumerate(c.layers):
        x = torch.cat([s.view(2, -1, s.shape[-1]) for s in seen[i]], 1)[0, -r:]
        h = layer._parts.hidden(x)
        torch.testing.assert_close(mags[i][0], h.float().square().sum(0).sqrt())
    stats = handle.stats()
    assert stats["retraced_tokens"] == r
    assert stats["dense_token_computations"] == pytest.approx(r / 2)
    handle.detach()


def test_ring_memory_is_bounded_and_the_baseline_rearms():
    model = tiny_model("llama")
    cfg = DARTConfig(
        layer_topk="all:0.5", drift={"window": 2, "retrace_tokens": 4, "retrace": "ffn_inputs"}
    )
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, {11: [0]})
    model.generate(random_ids(1, 10), max_new_tokens=30, do_sample=False, pad_token_id=0)
    c = handle.controller
    assert c.ring.state_bytes() == 3 * (1 * 5 * 32 * 4 + 8)  # R + 1 slots, whatever the length
    assert c.signal_ring.state_bytes() == 1 * 5 * 32 * 4 + 8
    assert [e["step"] for e in handle.stats()["drift_events"]] == [11]
    assert not c.monitor.pending.any() and bool(c.monitor.armed[0])  # re-armed from new windows
    handle.detach()


def test_other_signals_rebuild_their_baseline_from_the_following_windows():
    """`attn_probs` features depend on the cache they were computed with, so they are not
    ringed: after the event the row's baseline is pending until it has min_windows."""
    model = tiny_model("llama")
    cfg = DARTConfig(
        layer_topk="all:0.5",
        drift={"window": 2, "retrace_tokens": 4, "retrace": "ffn_inputs", "signal": "attn_probs"},
    )
    handle = dart.attach(model, cfg)
    c = handle.controller
    assert c.ring is not None and c.signal_ring is None
    force_drift(c, {9: [0]})
    cache = model(random_ids(1, 8), use_cache=True).past_key_values
    for t in range(16):  # the event after pass 9, two 2-token windows after it by pass 14
        model(torch.full((1, 1), 5 + t), past_key_values=cache, use_cache=True)
        if c.step == 10:  # right after the event: new masks, baseline still to come
            assert c.phase == [Phase.SPARSE] and bool(c.monitor.pending[0])
    assert not c.monitor.pending.any() and handle.stats()["retraced_tokens"] == 4
    handle.detach()


@pytest.mark.parametrize("backend", ["gathered", "masked"])
def test_compiled_loop_matches_hf_generate(backend):
    """Events on one row, both rows, the other row (left padding in row 1): the compiled
    decode step (one graph, the ring written inside it) gives HF generate's tokens, events
    and costs, and no event recompiles it."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    cfg = DARTConfig(
        layer_topk="all:0.5",
        backend=backend,
        drift={"window": 4, "retrace_tokens": 8, "retrace": "ffn_inputs"},
    )
    events = {11: [1], 15: [0, 1], 23: [0]}
    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    ref = model.generate(
        ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0
    )[:, ids.shape[1] :]
    ref_stats = handle.stats()
    handle.detach()
    assert len(ref_stats["drift_events"]) == 4

    handle = dart.attach(model, cfg)
    force_drift(handle.controller, events)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fast = FastGenerator(model, handle, max_len=64, compile=False)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    result = fast.generate(ids, mask, max_new_tokens=30)
    assert torch.equal(result.tokens, ref)
    keys = ("drift_events", "retraced_tokens", "dense_token_computations", "effective_sparsity")
    assert {k: result.stats[k] for k in keys} == {k: ref_stats[k] for k in keys}
    assert result.stats["retraced_tokens"] == 8 * 4 and result.trace_steps == 0
    assert counter.frame_count == 1
    handle.detach()


@pytest.mark.parametrize(
    "drift,field",
    [
        ({"retrace": "dense"}, "retrace"),
        ({"retrace": "ffn_inputs", "retrace_tokens": -1}, "retrace_tokens"),
    ],
)
def test_bad_retrace_settings_are_named(drift, field):
    with pytest.raises(ConfigError, match=f"DriftConfig.{field}"):
        DARTConfig(drift=drift)
    assert DriftConfig().retrace == "ffn_inputs"
