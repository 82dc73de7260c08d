"""The per-sequence schedule: trace -> mask -> monitor -> re-trace -> release."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from tiny_models import NO_DRIFT, drive, prefill_and_step, random_ids, tiny_config, tiny_model

import dart
from dart import DARTConfig
from dart.core.adapters import get_adapter
from dart.core.config import BACKENDS
from dart.core.controller import Controller, Phase
from dart.core.ffn import DARTFFN, DENSE, SPARSE, TRACE


def test_controller_is_built_complete():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    refs = adapter.layer_refs()
    parts = [adapter.ffn_parts(r) for r in refs]
    norms = [r.post_ffn_norm for r in refs]
    c = Controller(DARTConfig(layer_topk="all:0.5", backend="masked"), parts, norms)
    assert [type(f) for f in c.layers] == [DARTFFN] * len(parts)
    assert [f.layer_index for f in c.layers] == list(range(len(parts)))
    assert c.widths == [p.width for p in parts] and c.post_ffn_norms == norms
    assert c.fixed_counts == [p.width // 2 for p in parts] and c.monitors_drift
    c.begin(2)
    assert c.phase == [Phase.TRACE] * 2 and all(f.mode == TRACE for f in c.layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_masks_match_running_alone(backend):
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.4", backend=backend, drift=NO_DRIFT)
    long_ids, short_ids = random_ids(1, 12, seed=3), random_ids(1, 7, seed=4)
    alone = []
    for ids in (long_ids, short_ids):
        handle = dart.attach(model, cfg)
        _, step = prefill_and_step(model, ids, torch.ones_like(ids))
        alone.append((step, [f.idx.clone() for f in handle.ffns]))
        handle.detach()
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([long_ids, torch.cat([pad, short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    handle = dart.attach(model, cfg)
    _, step = prefill_and_step(model, batch, mask)
    for row, (alone_step, alone_idx) in enumerate(alone):
        for ffn, idx in zip(handle.ffns, alone_idx, strict=False):
            assert torch.equal(ffn.idx[row], idx[0]), "padding changed a sequence's mask"
        torch.testing.assert_close(step[row], alone_step[0], atol=1e-4, rtol=1e-4)
    # the two prompts get different masks
    assert any(not torch.equal(f.idx[0], f.idx[1]) for f in handle.ffns)
    handle.detach()


def test_shared_policy_uses_one_mask():
    model = tiny_model("llama")
    handle = dart.attach(
        model, DARTConfig(layer_topk="all:0.5", batch_policy="shared", drift=NO_DRIFT)
    )
    prefill_and_step(model, random_ids(3))
    assert all(f.idx.shape == (f.width // 2,) for f in handle.ffns)
    handle.detach()


@pytest.mark.parametrize("masking_step", [0, 1, 3])
@pytest.mark.parametrize("layer_topk", ["all:auto", "all:0.5"])
def test_masking_step(masking_step, layer_topk):
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk=layer_topk, masking_step=masking_step, drift=NO_DRIFT)
    handle = dart.attach(model, cfg)
    phases = drive(model, handle, random_ids(1), 5)
    first_sparse = max(masking_step, 1)  # m=0 builds the mask from the prompt (pass 0)
    # phases[s] is the phase after pass s, i.e. the phase in force for pass s+1
    assert [p[0] for p in phases[: first_sparse - 1]] == [Phase.TRACE] * (first_sparse - 1)
    assert phases[first_sparse - 1][0] == Phase.SPARSE
    stats = handle.stats()
    assert all(1 <= k <= n for k, n in zip(stats["keep_counts"], stats["widths"], strict=False))
    assert stats["nominal_sparsity"] == pytest.approx(0.5, abs=0.05)
    assert all(f.idx is not None for f in handle.ffns if f.keep < f.width)
    # effective sparsity counts the dense warm-up passes
    dense_passes = first_sparse - 1
    expected = stats["nominal_sparsity"] * (5 - dense_passes) / 5
    assert stats["effective_sparsity"] == pytest.approx(expected, abs=1e-6)
    handle.detach()


def test_auto_budget_follows_the_budget_config():
    model = tiny_model("llama")
    cfg = DARTConfig(total_prune=0.3, budget={"prune_min": 0.3, "prune_max": 0.3}, drift=NO_DRIFT)
    handle = dart.attach(model, cfg)
    drive(model, handle, random_ids(1), 1)
    stats = handle.stats()
    assert stats["budget_prune_fractions"] == pytest.approx([0.3] * 3)
    assert stats["keep_counts"] == [45] * 3  # round(0.7 * 64)
    handle.detach()


def test_release_step_goes_dense():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(release_step=4, drift=NO_DRIFT))
    phases = drive(model, handle, random_ids(2), 6)
    assert phases[2] == [Phase.SPARSE] * 2
    assert phases[3] == [Phase.RELEASED] * 2 and phases[6] == [Phase.RELEASED] * 2
    assert all(f.mode == "dense" for f in handle.ffns)
    handle.detach()


def test_forced_drift_retraces_one_row_and_keeps_cache():
    """Without a look-back (retrace_tokens 0) the row traces masking_step single-token passes;
    the look-back re-trace is tested in test_retrace.py."""
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.5", masking_step=2, drift={"window": 2, "retrace_tokens": 0})
    handle = dart.attach(model, cfg)
    c = handle.controller
    fired = {"n": 0}
    poll = c.monitor.poll

    def fake_poll():
        flags = torch.zeros_like(poll())  # only the forced event
        if c.step == 5 and fired["n"] == 0:
            fired["n"] = 1
            flags[1] = True
        return flags

    c.monitor.poll = fake_poll
    ids = random_ids(2)
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    before = None
    history = []
    for _ in range(9):
        cache_len = cache.get_seq_length()
        out = model(nxt, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == cache_len + 1  # the KV cache is kept
        nxt = out.logits[:, -1:].argmax(-1)
        history.append((c.step, list(c.phase), [f.idx.clone() for f in handle.ffns]))
        if c.step == 6:
            before = [f.idx.clone() for f in handle.ffns]
    events = handle.stats()["drift_events"]
    assert events == [{"step": 5, "row": 1}]
    by_step = {s: (p, idx) for s, p, idx in history}
    assert by_step[6][0] == [Phase.SPARSE, Phase.TRACE]  # row 1 re-traces, row 0 keeps its mask
    assert by_step[7][0] == [Phase.SPARSE, Phase.TRACE]  # dense window of masking_step passes
    assert by_step[8][0] == [Phase.SPARSE, Phase.SPARSE]  # new mask
    after = by_step[8][1]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(after, before, strict=False))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(after, before, strict=False))
    assert handle.stats()["mask_refreshes"] == 1
    stats = handle.stats()
    assert stats["decode_tokens"] == 2 * 9  # two rows, nine decode passes
    assert stats["drift_events_per_100_tokens"] == pytest.approx(100 / 18)
    handle.detach()


def test_effective_sparsity_per_layer():
    """Per layer: neurons skipped over the decode tokens; dense (tracing) rows skip none."""
    model = tiny_model("llama", layers=3)
    handle = dart.attach(
        model, DARTConfig(layer_topk="0:0.25,1:0.5", masking_step=3, drift=NO_DRIFT)
    )
    assert handle.stats()["effective_sparsity_per_layer"] == [0.0, 0.0, 0.0]
    drive(model, handle, random_ids(2), steps=6)  # passes 1-2 trace, 3-6 sparse
    stats = handle.stats()
    assert stats["decode_tokens"] == 12 and stats["drift_events_per_100_tokens"] == 0.0
    sparse = 8 / 12
    expected = [0.75 * sparse, 0.5 * sparse, 0.0]
    assert stats["effective_sparsity_per_layer"] == pytest.approx(expected)
    widths = stats["widths"]
    overall = sum(e * n for e, n in zip(expected, widths, strict=True)) / sum(widths)
    assert stats["effective_sparsity"] == pytest.approx(overall)
    handle.controller.reset_stats()
    assert handle.stats()["effective_sparsity_per_layer"] == [0.0, 0.0, 0.0]
    handle.detach()


def _topic_sampler(model):
    """Two disjoint token sets with clustered embeddings: synthetic 'topics'."""
    emb = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(7)
    topics = [list(range(3, 40)), list(range(50, 90))]
    with torch.no_grad():
        for tokens in topics:
            centre = torch.randn(emb.shape[1], generator=g)
            emb[tokens] = centre + torch.randn(len(tokens), emb.shape[1], generator=g)

    def sample(topic: int, n: int) -> torch.Tensor:
        tokens = torch.tensor(topics[topic])
        return tokens[torch.randint(len(tokens), (1, n), generator=g)]

    return sample


@torch.no_grad()
def _teacher_forced(model, prompt, continuation):
    cache = model(prompt, use_cache=True).past_key_values
    for t in range(continuation.shape[1]):
        model(continuation[:, t : t + 1], past_key_values=cache, use_cache=True)


def test_topic_switch_triggers_retrace_and_single_topic_does_not():
    model = tiny_model("llama")
    sample = _topic_sampler(model)
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 5}))
    prompt = sample(0, 30)
    _teacher_forced(model, prompt, sample(0, 60))
    assert handle.stats()["drift_events"] == []
    _teacher_forced(model, prompt, torch.cat([sample(0, 10), sample(1, 50)], 1))
    events = handle.stats()["drift_events"]
    assert events and 11 < events[0]["step"] <= 50  # after the switch at pass 11
    assert handle.stats()["mask_refreshes"] == len(events)
    handle.detach()


def test_attn_probs_monitor_runs_on_eager_attention():
    model = tiny_model("llama", attn="eager")
    sample = _topic_sampler(model)
    handle = dart.attach(model, DARTConfig(drift={"signal": "attn_probs", "window": 5}))
    _teacher_forced(model, sample(0, 20), sample(0, 20))
    history = handle.drift_history()[0]
    assert len(history) >= 3
    assert all(0.0 <= sim <= 1.0 + 1e-6 and tau == tau for _, sim, tau in history)
    handle.detach()
    sdpa = tiny_model("llama", attn="sdpa")
    handle = dart.attach(sdpa, DARTConfig(drift={"signal": "attn_probs"}))
    with pytest.raises(RuntimeError, match="eager"):
        sdpa(random_ids(1))
    handle.detach()


def test_single_token_trace_never_disables_detection():
    """masking_step 0/1 with a 1-token prompt: the threshold must stay finite."""
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(masking_step=0, drift={"window": 5}))
    drive(model, handle, random_ids(1, 1), 12)
    tau = handle.controller.monitor.tau
    assert torch.isfinite(tau).all()
    assert all(
        k < n for k, n in zip(handle.stats()["keep_counts"], handle.stats()["widths"], strict=False)
    )
    handle.detach()


def test_sampling_generate_runs():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig())
    torch.manual_seed(0)
    out = model.generate(random_ids(2), max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (2, 18)
    assert handle.stats()["decode_passes"] == 7
    handle.detach()


def test_extra_state_is_small_on_the_packaged_shape():
    """Gathered backend state stays under 1% of the FFN weights (SmolLM2-like shape)."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config("llama")
    cfg.update({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4})
    cfg.update({"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64})
    model = LlamaForCausalLM(cfg).eval()
    handle = dart.attach(model, DARTConfig(drift=NO_DRIFT))
    prefill_and_step(model, random_ids(1, 16))
    ffn_bytes = sum(3 * 576 * 1536 * 4 for _ in range(4))
    stats = handle.stats()
    assert stats["extra_state_bytes_total"] < 0.01 * ffn_bytes
    assert stats["mask_builds"] == 1 and stats["selection_seconds"] > 0.0  # the build is timed
    handle.detach()


def test_paused_forwards_leave_the_schedule_untouched():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    c = handle.controller
    drive(model, handle, random_ids(2), 2)
    state = (c.step, list(c.phase), handle.stats()["decode_passes"], c.monitor)
    masks = [f.idx.clone() for f in handle.ffns]
    with c.paused(3), ExitStack() as stack:
        assert c.batch_size == 3 and not c.auto_step and c.monitor is None
        for f in handle.ffns:
            stack.enter_context(f.routed())  # dense: the masks are for 2 rows
        with torch.no_grad():
            model(random_ids(3), use_cache=False)  # no begin(): the hooks are inert
    assert (c.step, c.phase, handle.stats()["decode_passes"], c.monitor) == state
    assert c.batch_size == 2 and c.auto_step
    assert all(torch.equal(a, f.idx) for a, f in zip(masks, handle.ffns, strict=True))
    assert all(f.mode == SPARSE for f in handle.ffns)
    handle.reset()
    assert handle.stats()["decode_passes"] == 0 and handle.stats()["mask_builds"] == 0
    handle.detach()


def test_select_traced_builds_masks_before_the_masking_step():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", masking_step=4, drift=NO_DRIFT))
    c = handle.controller
    with torch.no_grad():
        model(random_ids(2), use_cache=False)
    assert c.phase == [Phase.TRACE] * 2
    c.select_traced()
    assert c.phase == [Phase.SPARSE] * 2 and all(f.mode == SPARSE for f in handle.ffns)
    handle.detach()
    dense = dart.attach(model, DARTConfig(method="dense"))
    with torch.no_grad():
        model(random_ids(2), use_cache=False)
    dense.controller.select_traced()  # nothing to select: dense stays dense
    assert all(f.mode == DENSE for f in dense.ffns)
    dense.detach()
