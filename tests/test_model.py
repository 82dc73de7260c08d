"""Model-level behaviour of DART on tiny random models of every supported family."""

from __future__ import annotations

import pytest
import torch
from models import FAMILIES, VOCAB, tiny_model

import dart
from dart import DARTConfig
from dart.controller import Phase

BACKENDS = ("masked", "gathered", "compact")
NO_DRIFT = {"enabled": False}


def _ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _prefill_and_step(model, ids, attention_mask=None):
    out = model(ids, attention_mask=attention_mask, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
    step = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_everything_is_identical_and_detach_restores(family, backend):
    model = tiny_model(family)
    ids = _ids()
    ref_prefill, ref_step = _prefill_and_step(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = dart.attach(model, DARTConfig(layer_topk="all:1.0", backend=backend))
    prefill, step = _prefill_and_step(model, ids)
    assert torch.equal(prefill, ref_prefill) and torch.equal(step, ref_step)
    handle.detach()
    # a pruning attach re-lays weights out; detach must restore them bit for bit
    handle = dart.attach(model, DARTConfig(total_prune=0.5, backend=backend))
    _prefill_and_step(model, ids)
    handle.detach()
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(restored[k], v) and restored[k].is_contiguous() == v.is_contiguous(), k
    prefill, step = _prefill_and_step(model, ids)
    assert torch.equal(prefill, ref_prefill) and torch.equal(step, ref_step)


@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree_and_pruning_changes_output(family):
    model = tiny_model(family)
    ids = _ids()
    _, dense_step = _prefill_and_step(model, ids)
    steps, selections = {}, {}
    for backend in BACKENDS:
        cfg = DARTConfig(layer_topk="all:0.5", backend=backend, drift=NO_DRIFT)
        handle = dart.attach(model, cfg)
        _, steps[backend] = _prefill_and_step(model, ids)
        selections[backend] = [f.idx.clone() for f in handle.ffns]
        assert all(f.idx.shape == (2, f.width // 2) for f in handle.ffns)
        handle.detach()
    for backend in BACKENDS[1:]:
        assert all(
            torch.equal(a, b)
            for a, b in zip(selections["masked"], selections[backend], strict=False)
        )
        torch.testing.assert_close(steps[backend], steps["masked"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steps["masked"], dense_step, atol=1e-3)


def test_bf16_backends_agree():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = _ids()
    steps = {}
    for backend in BACKENDS:
        handle = dart.attach(
            model, DARTConfig(layer_topk="all:0.5", backend=backend, drift=NO_DRIFT)
        )
        _, steps[backend] = _prefill_and_step(model, ids)
        handle.detach()
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(steps[backend], steps["masked"], atol=0.1, rtol=0.05)


def test_unsupported_model_lists_families():
    from transformers import BertConfig, BertModel

    model = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(ValueError, match="supported families: llama.*gpt2.*opt"):
        dart.attach(model, DARTConfig())


def test_attach_twice_is_refused():
    model = tiny_model()
    handle = dart.attach(model, DARTConfig(backend="masked"))
    with pytest.raises(RuntimeError, match="already has DART attached"):
        dart.attach(model, DARTConfig())
    handle.detach()
    dart.attach(model, DARTConfig()).detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_masks_match_running_alone(backend):
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.4", backend=backend, drift=NO_DRIFT)
    long_ids, short_ids = _ids(1, 12, seed=3), _ids(1, 7, seed=4)
    alone = []
    for ids in (long_ids, short_ids):
        handle = dart.attach(model, cfg)
        _, step = _prefill_and_step(model, ids, torch.ones_like(ids))
        alone.append((step, [f.idx.clone() for f in handle.ffns]))
        handle.detach()
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([long_ids, torch.cat([pad, short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    handle = dart.attach(model, cfg)
    _, step = _prefill_and_step(model, batch, mask)
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
    _prefill_and_step(model, _ids(3))
    assert all(f.idx.shape == (f.width // 2,) for f in handle.ffns)
    handle.detach()


def _drive(model, handle, ids, steps: int):
    """Prefill, then `steps` greedy single-token passes through the cache."""
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    phases = [list(handle.controller.phase)]
    for _ in range(steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        phases.append(list(handle.controller.phase))
    return phases


@pytest.mark.parametrize("masking_step", [0, 1, 3])
@pytest.mark.parametrize("layer_topk", ["all:auto", "all:0.5"])
def test_masking_step(masking_step, layer_topk):
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk=layer_topk, masking_step=masking_step, drift=NO_DRIFT)
    handle = dart.attach(model, cfg)
    phases = _drive(model, handle, _ids(1), 5)
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


def test_release_step_goes_dense():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(release_step=4, drift=NO_DRIFT))
    phases = _drive(model, handle, _ids(2), 6)
    assert phases[2] == [Phase.SPARSE] * 2
    assert phases[3] == [Phase.RELEASED] * 2 and phases[6] == [Phase.RELEASED] * 2
    assert all(f.mode == "dense" for f in handle.ffns)
    handle.detach()


def test_forced_drift_retraces_one_row_and_keeps_cache():
    model = tiny_model("llama")
    cfg = DARTConfig(layer_topk="all:0.5", masking_step=2, drift={"window": 2})
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
    ids = _ids(2)
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
        sdpa(_ids(1))
    handle.detach()


def test_single_token_trace_never_disables_detection():
    """masking_step 0/1 with a 1-token prompt: the threshold must stay finite."""
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig(masking_step=0, drift={"window": 5}))
    _drive(model, handle, _ids(1, 1), 12)
    tau = handle.controller.monitor.tau
    assert torch.isfinite(tau).all()
    assert all(
        k < n for k, n in zip(handle.stats()["keep_counts"], handle.stats()["widths"], strict=False)
    )
    handle.detach()


@pytest.mark.parametrize("method", ["dense", "static", "griffin", "random", "dart"])
def test_methods_generate(method):
    model = tiny_model("llama")
    cfg = DARTConfig(method=method, layer_topk="all:0.5")
    handle = dart.attach(model, cfg)
    if method == "static":
        with pytest.raises(RuntimeError, match="calibration"):
            model.generate(_ids(1), max_new_tokens=3, do_sample=False)
        handle.calibrate(_ids(1, 30, seed=9))
    out = model.generate(_ids(2), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 16)
    stats = handle.stats()
    expected = 0.0 if method == "dense" else 0.5
    assert stats["nominal_sparsity"] == pytest.approx(expected, abs=0.02)
    if method in ("static",):
        assert all(f.idx.dim() == 1 for f in handle.ffns)
    handle.detach()


def test_sampling_generate_runs():
    model = tiny_model("llama")
    handle = dart.attach(model, DARTConfig())
    torch.manual_seed(0)
    out = model.generate(_ids(2), max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (2, 18)
    assert handle.stats()["decode_passes"] == 7
    handle.detach()


def test_ranking_with_output_proxy(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    model = tiny_model("llama")
    for ranking in ("max", "mean", "combined", "product"):
        handle = dart.attach(model, DARTConfig(ranking=ranking, layer_topk="all:0.5"))
        _prefill_and_step(model, _ids())
        assert handle.controller.proxies is not None
        handle.detach()
    assert any(tmp_path.rglob("*"))  # proxies were cached on disk


def test_extra_state_is_small_on_the_packaged_shape():
    """Gathered backend state stays under 1% of the FFN weights (SmolLM2-like shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    model = LlamaForCausalLM(cfg).eval()
    handle = dart.attach(model, DARTConfig(drift=NO_DRIFT))
    _prefill_and_step(model, _ids(1, 16))
    ffn_bytes = sum(3 * 576 * 1536 * 4 for _ in range(4))
    stats = handle.stats()
    assert stats["extra_state_bytes_total"] < 0.01 * ffn_bytes
    assert stats["mask_builds"] == 1 and stats["selection_seconds"] > 0.0  # the build is timed
    handle.detach()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepare_and_hold_score_under_context_masks(backend):
    """Log-likelihood protocol: masks from the context only, then the full text under them."""
    model = tiny_model("llama")
    context, full = _ids(2, 8, seed=5), None
    full = torch.cat([context, _ids(2, 4, seed=6)], 1)
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", backend=backend))
    handle.prepare(context)
    masks = [f.idx.clone() for f in handle.ffns]
    with handle.hold():
        held = model(full).logits
        model(full)  # a second forward does not re-trace
    assert all(torch.equal(a, f.idx) for a, f in zip(masks, handle.ffns, strict=True))
    assert all(f.mode == "sparse" for f in handle.ffns)
    handle.detach()
    # the same masks applied by hand through the masked reference path
    ref = dart.attach(model, DARTConfig(layer_topk="all:0.5", backend="masked"))
    ref.prepare(context)
    with ref.hold():
        expected = model(full).logits
    ref.detach()
    torch.testing.assert_close(held, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(held, model(full).logits, atol=1e-3)
