"""bench/decode.py end to end on a tiny random Llama: the records and the table it promises."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bench_quick_writes_every_arm(tmp_path):
    out = tmp_path / "decode.json"
    cmd = [sys.executable, str(ROOT / "bench" / "decode.py"), "--model", "random:tiny"]
    cmd += ["--quick", "--new-tokens", "12", "--batch", "2", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    records = {r["arm"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"hf_dense", "hf_static_compiled", "dense_compiled", "dart_masked",
                            "dart_gathered_compiled"}  # fmt: skip
    for r in records.values():
        assert r["tokens_per_s"] > 0 and r["memory_mb"] > 0 and r["batch"] == 2
    assert records["dense_compiled"]["speedup_vs_dense_compiled"] == 1.0
    gathered = records["dart_gathered_compiled"]
    assert gathered["sparsity"] == 0.7 and gathered["ideal_speedup"] > 1.0
    # look-back re-traces recompute up to R tokens densely each: on a random tiny model drift
    # fires often, so the FFN work can exceed dense (effective sparsity below 0)
    assert gathered["effective_sparsity"] <= 0.7
    assert gathered["dense_token_computations_per_token"] >= 0.0
    assert gathered["effective_sparsity"] < 0.7 or gathered["retraces"] == 0
    assert gathered["prefill_seconds"] > 0 and gathered["selection_ms"] > 0
    assert gathered["compiled_graphs"] == 0  # the warm-up round compiled every graph it needs
    assert "vs dense_c." in run.stdout and "dart_gathered_compiled" in run.stdout
    hf = records["hf_static_compiled"]["tokens_per_s"]
    assert records["hf_static_compiled"]["speedup_vs_hf_static_compiled"] == 1.0
    assert gathered["speedup_vs_hf_static_compiled"] == gathered["tokens_per_s"] / hf
    assert "vs hf_static" in run.stdout


def test_decode_bench_rejects_unknown_inputs():
    bench = str(ROOT / "bench" / "decode.py")
    for args, message in (
        (["--model", "random:nope"], "shapes are"),
        (["--dart.batch_policy", "rows"], "--dart.batch_policy: invalid choice: 'rows'"),
        (["--dart.drift.window", "0"], "--dart.drift.window: 0 is below the minimum 1"),
        (["--dart.budget.prune_min", "0.95"], "--dart.budget.prune_min: 0.95 is greater"),
        (["--model", "random:tiny", "--dtype", "fp16"], "--dtypes 'fp16': use fp32"),
    ):
        run = subprocess.run([sys.executable, bench, *args], capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_decode_bench_takes_the_dart_flags_of_every_command():
    decode = _decode_module()
    args = decode.build_parser().parse_args(
        ["--dart.layer_topk", "all:auto", "--dart.drift.retrace_tokens", "32",
         "--dart.batch_policy", "shared", "--dart.budget.uniform_blend", "0.25"]
    )  # fmt: skip
    config = decode._config(args, 0.7, "compact")
    assert (config.total_prune, config.backend, config.batch_policy) == (0.7, "compact", "shared")
    assert config.drift.retrace_tokens == 32 and config.budget.uniform_blend == 0.25
    text = decode.build_parser().format_help()
    assert "--dart.drift.retrace_tokens" in text and "--dart.budget.uniform_blend" in text
    assert "--dart.total_prune" not in text and "--dart.backend" not in text  # the bench's own


def _decode_module():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeArm:
    name = "fake"

    def __init__(self):
        self.runs = 0

    def run(self, ids, mask, new_tokens, pad_id):
        self.runs += 1
        return {"tokens_per_s": float(self.runs)}


@pytest.mark.parametrize("compiling_runs, runs, flagged", [(0, 1, 0), (1, 2, 0), (9, 3, 1)])
def test_measured_runs_that_compiled_are_run_again(monkeypatch, compiling_runs, runs, flagged):
    decode = _decode_module()
    arm = _FakeArm()
    # one more graph after each of the first `compiling_runs` runs
    monkeypatch.setattr(decode, "compiled_graphs", lambda: min(arm.runs, compiling_runs))
    rec = decode.measure(arm, None, None, 4, 0)
    assert arm.runs == runs and rec["tokens_per_s"] == runs
    assert rec["compiled_graphs"] == flagged


def test_decode_bench_per_token_arms_follow_the_weights_and_the_policy(capsys):
    """Per-token arms: the gate modes run on q4 weights, the input mode is skipped there (and
    a sparsity out of a mode's reach is skipped), each with its reason on stderr; the bench's
    batch policy reaches the arm's config (shared: the union policy)."""
    decode = _decode_module()
    args = decode.build_parser().parse_args(["--dart.batch_policy", "shared"])
    args.batch_policy = "shared"
    assert decode._runnable("pertoken_gate_compiled", args, 0.4, "q4")
    assert decode._runnable("pertoken_input", args, 0.4, "fp")
    assert not decode._runnable("pertoken_input_compiled", args, 0.4, "q4")
    assert not decode._runnable("pertoken_gate", args, 0.7, "fp")  # the gate alone is 1/3
    err = capsys.readouterr().err
    assert "skipped on q4 weights" in err and "total_prune" in err
    config = decode._per_token_config("pertoken_gate-weighted_compiled", args, 0.4)
    assert (config.method, config.backend, config.batch_policy) == (
        "gate-weighted",
        "gathered",
        "shared",
    )
