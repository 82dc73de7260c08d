"""Quantised models (`dart.quantize`, dart/core/quant.py): the dense quantised model against the fp
model within the format's error, quantise -> attach -> compiled loop -> export round trips
token-equal to the eager quantised model, the streamed (direct) load, and bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing
from test_adapters import _biased_model
from test_export import MAX_LEN, RUNNER, TORCH_ONLY, _batch
from tiny_assets import save_tiny
from tiny_models import NO_DRIFT, random_ids, tiny_model
from torch import nn

import dart
from dart import DARTConfig
from dart.core.quant import (
    QuantGLU,
    QuantLinear,
    quant_nbytes,
    quantize,
    quantize_streamed,
    quantized_spec,
)
from dart.runtime.export import DARTExportModule, export_decode, export_programs
from dart.runtime.export import resolve_export_counts as counts_of
from dart.runtime.fast import FastGenerator
from dart.runtime.loading import load_model
from dart_ext.quant import error_bound, quantize_activations

FIXED = DARTConfig(layer_topk="all:0.5", drift=NO_DRIFT)


def _linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp weights of every matrix quantize() replaces, in the quantised rows' layout."""
    out = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            w = m.weight.detach()
            out[name] = w.t() if name.endswith("down_proj") else w  # down rows: neuron-major
    return out


def _rows(model: nn.Module) -> dict[str, object]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantGLU):
            for part in ("gate_proj", "up_proj", "down_proj"):
                out[f"{name}.{part}"] = getattr(m, part)
        elif isinstance(m, QuantLinear) and name.rsplit(".", 1)[-1] not in (
            "gate_proj",
            "up_proj",
        ):
            out[name] = m
    return out


@pytest.mark.parametrize("fmt", ["q8", "q4", "q4m"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_every_matrix_is_within_half_a_step_of_the_fp_weight(family, fmt):
    model = tiny_model(family)
    fp = copy.deepcopy(model)
    quantize(model, fmt)
    rows = _rows(model)
    ref = _linears(fp)
    if family == "phi3":  # fused gate_up [2N, d], gate first; fused qkv stays one matrix
        for i in range(3):
            fused = ref.pop(f"model.layers.{i}.mlp.gate_up_proj")
            n = fused.shape[0] // 2
            ref[f"model.layers.{i}.mlp.gate_proj"] = fused[:n]
            ref[f"model.layers.{i}.mlp.up_proj"] = fused[n:]
    assert set(rows) == set(ref)
    for name, w in ref.items():
        err = (rows[name].dequantized() - w).abs()
        assert (err <= error_bound(rows[name].rows()) + 1e-6).all(), name
    assert not any(type(m) is nn.Linear for m in model.modules())  # the whole step is quantised
    assert model.get_input_embeddings().weight.dtype == torch.float32  # embeddings stay


@pytest.mark.parametrize(("fmt", "tol"), [("q8", 0.02), ("q4", 0.5), ("q4m", 0.5)])
def test_dense_quantised_logits_are_close_to_the_fp_model(fmt, tol):
    """Against the fp model: within the format's error (q8 tight; 4-bit rows of a random model
    with weights scaled x4 are coarse). Against the fp model running on the dequantised rows:
    equal up to the int8 rounding of the activations (the rows are what the kernels read)."""
    model = tiny_model("llama")
    ids = random_ids(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
        fp = copy.deepcopy(model)
        quantize(model, fmt)
        got = model(ids).logits
        rows = _rows(model)
        for name, m in fp.named_modules():
            if name in rows:
                w = rows[name].dequantized()
                m.weight.copy_(w.t() if name.endswith("down_proj") else w)
        same_rows = fp(ids).logits
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < tol, rel
    assert (got - same_rows).norm() / same_rows.norm() < 0.03


def test_a_quantised_linear_is_the_dequantised_one_on_rounded_inputs():
    """The op's arithmetic: x rounded to int8 per 32 values against the dequantised rows."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    q = QuantLinear.from_linear(lin, "q4", 32)
    x = torch.randn(3, 5, 64)
    ref = torch.nn.functional.linear(quantize_activations(x), q.dequantized(), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)


def test_quantised_model_state_moves_and_casts():
    model = quantize(tiny_model("llama"), "q4")
    state = model.state_dict()
    assert "model.layers.0.mlp.down_proj.qdata" in state and "lm_head.qscales" in state
    assert "model.layers.0.mlp.all_idx" not in state  # derived, not saved
    scales = model.lm_head.qscales.clone()
    model.to(torch.bfloat16)  # floats cast; the fp16 scales (int16 bits) must not be rounded
    assert torch.equal(model.lm_head.qscales, scales)
    assert model.model.layers[0].mlp.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(random_ids(1, 8)).logits.dtype == torch.bfloat16
    fp_bytes = sum(w.numel() * 4 for w in _linears(tiny_model("llama")).values())
    assert quant_nbytes(model) < fp_bytes / 6  # q4 + fp16 scales per 32: 0.5625 B per value


def test_quantised_dense_model_generates_alike_in_hf_and_the_static_cache_loop():
    model = quantize(tiny_model("llama"), "q8")
    ids, mask = _batch()
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, 12:]
    loop = FastGenerator(model, None, max_len=MAX_LEN, compile=False)
    assert torch.equal(loop.generate(ids, mask, max_new_tokens=10).tokens, hf)


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_attach_prunes_over_the_quantised_rows(fmt):
    """DART on a quantised model: the gathered backend equals the masked reference (the same
    rows, summed in another order), and detach gives back the quantised model."""
    model = quantize(tiny_model("llama"), fmt)
    ids = random_ids(2, 10)
    with torch.no_grad():
        dense = model(ids).logits
        outs = {}
        for backend in ("masked", "gathered"):
            handle = dart.attach(model, FIXED, backend=backend)
            handle.prepare(ids)
            with handle.hold():
                outs[backend] = model(ids).logits
            assert handle.controller.layers[0].keep == 32
            handle.detach()
        assert torch.equal(model(ids).logits, dense)
    torch.testing.assert_close(outs["gathered"], outs["masked"], rtol=1e-4, atol=1e-4)
    assert (outs["gathered"] - dense).abs().max() > 1e-3  # pruning changed something


@pytest.mark.parametrize("fmt", ["q8", "q4m"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "llama-mlp-bias"])
def test_compact_backend_equals_gathered_on_quantised_rows(fmt, family):
    """`compact` copies the kept quantised rows (data, scales, mins, gate / up biases) into
    contiguous buffers at each selection and runs the same kernel on them: the same logits as
    `gathered` (bitwise: the same rows in the same order), shared and per-sequence masks, after a
    re-selection too; detach leaves the quantised model as it was."""
    model = _biased_model("llama") if family == "llama-mlp-bias" else tiny_model(family)
    model = quantize(model, fmt)
    ids = random_ids(2, 10)
    with torch.no_grad():
        dense = model(ids).logits
        for policy in ("shared", "per_sequence"):
            outs, state = {}, {}
            for backend in ("gathered", "compact"):
                handle = dart.attach(model, FIXED, backend=backend, batch_policy=policy)
                for prompt in (ids, ids.flip(1)):  # the second selection reuses the buffers
                    handle.prepare(prompt)
                    with handle.hold():
                        outs[backend, prompt is ids] = model(ids).logits
                state[backend] = handle.stats()["extra_state_bytes"]["selections"]
                handle.detach()
            for first in (True, False):
                assert torch.equal(outs["compact", first], outs["gathered", first]), policy
            assert not torch.equal(outs["compact", True], outs["compact", False])
            assert state["compact"] > state["gathered"]  # the copies are reported
        assert torch.equal(model(ids).logits, dense)


def test_quantise_attach_compiled_loop_and_export_round_trip():
    """One compile of the DART step (quantised attention, head and gathered FFNs), then the
    exported programs: all token-equal to the eager quantised model."""
    model = quantize(tiny_model("llama", layers=2), "q4")
    ids, mask = _batch()
    handle = dart.attach(model, FIXED)
    ref = FastGenerator(model, handle, max_len=MAX_LEN, compile=False).generate(ids, mask, 16)
    compiled = FastGenerator(model, handle, max_len=MAX_LEN).generate(ids, mask, 16)
    assert torch.equal(compiled.tokens, ref.tokens)
    assert compiled.stats["keep_counts"] == [32, 32]
    wrapper = DARTExportModule(handle, 2, MAX_LEN, counts_of(handle))
    programs = export_programs(wrapper)
    ops = {str(n.target) for n in programs["decode"].graph.nodes}
    assert "dart.gathered_glu_ffn_q.default" in ops and "dart.linear_q.default" in ops
    modules = (programs["prefill"].module(), programs["decode"].module())
    assert torch.equal(wrapper.generate(ids, mask, 16), ref.tokens)
    assert torch.equal(wrapper.generate(ids, mask, 16, programs=modules), ref.tokens)
    handle.detach()


def test_compact_quantised_compiled_loop_equals_eager_gathered():
    """The step over compact quantised rows (per-sequence masks: buffers [B, k, ...] flattened,
    positions b * k + j) captured whole by torch.compile: token-equal to the eager gathered
    loop, and one graph for two prompts (the second re-selects into the same buffers)."""
    model = quantize(tiny_model("qwen2", layers=2), "q4")
    ids, mask = _batch()
    prompts = (ids, ids.flip(1))
    handle = dart.attach(model, FIXED, backend="gathered", batch_policy="per_sequence")
    eager = FastGenerator(model, handle, max_len=MAX_LEN, compile=False)
    want = [eager.generate(p, mask, 12).tokens for p in prompts]
    handle.detach()
    handle = dart.attach(model, FIXED, backend="compact", batch_policy="per_sequence")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    fast = FastGenerator(model, handle, max_len=MAX_LEN, compile=False)
    fast.step_fn = torch.compile(fast._decode_step, backend=counter, fullgraph=True)
    for p, w in zip(prompts, want, strict=True):
        handle.reset()
        assert torch.equal(fast.generate(p, mask, 12).tokens, w)
    assert counter.frame_count == 1
    handle.detach()


def test_a_quantised_package_runs_torch_only(tmp_path):
    model = quantize(tiny_model("llama", layers=1), "q8")
    ids, mask = _batch()
    handle = dart.attach(model, FIXED)
    ref = FastGenerator(model, handle, max_len=MAX_LEN, compile=False).generate(ids, mask, 12)
    handle.detach()
    export_decode(model, tmp_path / "pkg", batch_size=2, max_len=MAX_LEN, config=FIXED)
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["weights"] == "q8/32" and manifest["vocab_size"] == 96
    prompts = [",".join(map(str, ids[0].tolist())), ",".join(map(str, ids[1, 3:].tolist()))]
    run = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    cmd = [sys.executable, "-c", TORCH_ONLY + run, str(RUNNER), str(tmp_path / "pkg")]
    cmd += [a for p in prompts for a in ("--prompt-ids", p)]
    cmd += ["--max-new-tokens", "12", "--ignore-eos", "--json", str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "out.json").read_text())["tokens"] == ref.tokens.tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_the_streamed_load_equals_quantising_the_loaded_model(tied):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    fp = tiny_model("qwen2")  # q/k/v biases
    if tied:
        fp.config.tie_word_embeddings = True
        fp.tie_weights()
    state = {k: v.clone() for k, v in fp.state_dict().items()}
    if tied:
        del state["lm_head.weight"]  # a tied GGUF has no output tensor
    ref = quantize(fp, "q4")
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(ref.config))
    skeleton.config.tie_word_embeddings = tied
    if tied:
        skeleton.tie_weights()
    got = quantize_streamed(skeleton, iter(state.items()), "q4")
    assert quantized_spec(got) == quantized_spec(ref)
    want = ref.state_dict()
    have = got.state_dict()
    assert set(have) == set(want)
    for k in want:
        assert torch.equal(have[k], want[k]), k
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_the_streamed_load_names_a_missing_tensor():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    fp = tiny_model("llama")
    state = dict(fp.state_dict())
    del state["model.norm.weight"]
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(fp.config)
    with pytest.raises(ValueError, match="model.norm.weight"):
        quantize_streamed(skeleton, iter(state.items()), "q8")


def test_load_model_quantises_a_local_folder(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    model, _ = load_model(str(folder), weights="q8")
    assert quantized_spec(model).fmt == "q8" and model.dart_load["direct"] is False
    assert model.dart_load["peak_rss_bytes"] > 0
    with pytest.raises(ValueError, match="weights must be one of fp, q8, q4, q4m, got 'q3'"):
        load_model(str(folder), weights="q3")
    with pytest.raises(ValueError, match="direct=True reads a packaged GGUF model"):
        load_model(str(folder), weights="q4", direct=True)


def test_bad_input_names_the_option():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"fmt: unknown quantisation format 'q3'"):
        quantize(model, "q3")
    with pytest.raises(ValueError, match=r"group must be one of \(32, 64\)"):
        quantize(model, "q4", group=16)
    with pytest.raises(ValueError, match=r"group = 64 does not divide the row length d = 32"):
        quantize(model, "q4", group=64)  # d = 32
    assert quantized_spec(model) is None
    assert all(type(m) is not QuantLinear for m in model.modules())  # nothing half-done
    with pytest.raises(ValueError, match="gated-FFN families"):
        quantize(tiny_model("gpt2"), "q8")
    quantize(model, "q8")
    with pytest.raises(RuntimeError, match=r"already quantised \(q8, group 32\)"):
        quantize(model, "q4")
    handle = dart.attach(model, FIXED)
    with pytest.raises(RuntimeError, match="quantize before dart.attach"):
        quantize(model, "q8")
    handle.detach()


def test_quantising_an_attached_model_is_refused():
    model = tiny_model("llama")
    handle = dart.attach(model, FIXED)
    with pytest.raises(RuntimeError, match="quantize before dart.attach"):
        quantize(model, "q8")
    handle.detach()


@pytest.mark.parametrize("source", ["embedding", "lm_head"])
def test_output_proxy_rankings_read_the_dequantised_rows(source, tmp_path, monkeypatch):
    """Non-magnitude rankings score neurons with output proxies: on a quantised model they come
    from the dequantised down rows (and head), equal to those of the fp model so rounded."""
    from dart.core.scoring import output_proxy

    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    model = quantize(tiny_model("llama"), "q4")
    down = model.model.layers[1].mlp.down_proj.dequantized()
    handle = dart.attach(model, FIXED, ranking="combined", proxy_source=source)
    vocab = model.get_input_embeddings().weight if source == "embedding" else None
    vocab = model.lm_head.dequantized() if vocab is None else vocab
    want = output_proxy(down, vocab)
    got = handle.controller.proxies[1]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    handle.prepare(random_ids(1, 8))
    assert handle.controller.layers[1].keep == 32
    handle.detach()


def test_weight_bytes_count_the_quantised_rows():
    from dart.evaluate.stream import weight_bytes

    fp = tiny_model("llama")
    handle = dart.attach(fp, FIXED)
    fp_total, fp_neuron = weight_bytes(fp, handle)
    handle.detach()
    model = quantize(fp, "q8")
    handle = dart.attach(model, FIXED)
    total, per_neuron = weight_bytes(model, handle)
    handle.detach()
    # q8 + an fp16 scale per 32 values: 1.0625 of 4 bytes per value
    assert total == pytest.approx(fp_total * 1.0625 / 4, rel=1e-6)
    assert per_neuron == pytest.approx([b * 1.0625 / 4 for b in fp_neuron], rel=1e-6)


@pytest.mark.parametrize("fmt", ["q8", "q4", "q4m"])
@pytest.mark.parametrize("group", [32, 64])
def test_dequantized_rows_equal_the_reference(fmt, group):
    from dart_ext.quant import dequantize_rows

    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(128, 40), fmt, group)
    assert torch.equal(q.dequantized(), dequantize_rows(q.rows()))


def test_the_head_can_keep_a_finer_format():
    model = quantize(tiny_model("llama"), "q4", head="q8")
    assert model.lm_head.fmt == "q8" and model.model.layers[0].mlp.gate_proj.fmt == "q4"
    fp = tiny_model("llama")
    assert type(quantize(fp, "q4", head=False).lm_head) is nn.Linear
    with pytest.raises(ValueError, match="fmt: unknown quantisation format 'q2'"):
        quantize(tiny_model("llama"), "q4", head="q2")
