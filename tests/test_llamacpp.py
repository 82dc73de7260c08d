"""dart.llamacpp, bench/decode.py's llamacpp arm and bench/quality_speed.py, without llama.cpp.

Nothing here builds llama.cpp or loads the 1.5B model: the parsers read canned outputs, the
tools are small fake scripts, and the build runs with a fake subprocess or a fake build step.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from dart import llamacpp

ROOT = Path(__file__).resolve().parents[1]

# the shape of `llama-bench -o json` (tools/llama-bench/llama-bench.cpp, json_printer), two tests
BENCH_JSON = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) CPU",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/c/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "model_type": "qwen2 1.5B Q4_K - Medium",
    "model_size": 1117320736,
    "model_n_params": 1777088000,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 0,
    "test_time": "2026-01-01T00:00:00Z",
    "avg_ns": 2000000000,
    "stddev_ns": 1000000,
    "avg_ts": 16.000000,
    "stddev_ts": 0.500000,
    "samples_ns": [ 1960000000, 2040000000 ],
    "samples_ts": [ 16.3265, 15.6863 ]
  },
  {
    "build_commit": "unknown",
    "cpu_info": "Intel(R) Xeon(R) CPU",
    "model_filename": "/c/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "model_type": "qwen2 1.5B Q4_K - Medium",
    "model_size": 1117320736,
    "model_n_params": 1777088000,
    "n_threads": 1,
    "n_prompt": 0,
    "n_gen": 128,
    "avg_ts": 9.5,
    "stddev_ts": 0.0,
    "samples_ts": [ 9.5 ]
  }
]
"""

# the shape of llama-perplexity's output (tools/perplexity/perplexity.cpp), stderr and stdout
PPL_OUTPUT = """build: 0 (unknown) with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu
llama_model_loader: loaded meta data with 29 key-value pairs
perplexity: tokenizing the input ..
perplexity: tokenization took 512.3 ms
perplexity: calculating perplexity over 3 chunks, n_ctx=512, batch_size=2048, n_seq=4
perplexity: 9.80 seconds per pass - ETA 0.15 minutes
[1]11.2345,[2]12.5000,[3]10.9876,
Final estimate: PPL = 10.9876 +/- 0.84321

llama_perf_context_print:        load time =     812.34 ms
"""


# ----------------------------------------------------------------------------- parsers


def test_parse_bench_json_reads_every_test():
    recs = llamacpp.parse_bench_json(BENCH_JSON)
    assert [(r.n_threads, r.n_prompt, r.n_gen) for r in recs] == [(2, 0, 32), (1, 0, 128)]
    assert recs[0].avg_ts == 16.0 and recs[0].stddev_ts == 0.5
    assert recs[0].samples_ts == (16.3265, 15.6863)
    assert recs[0].model_type == "qwen2 1.5B Q4_K - Medium"
    assert recs[0].model_size == 1117320736 and recs[1].cpu_info.startswith("Intel")
    assert recs[1].to_dict()["samples_ts"] == (9.5,)


@pytest.mark.parametrize(
    "text, message",
    [
        ("error: failed to load model", "printed no JSON list"),
        ('{"avg_ts": 1}', "expected a list"),
        ('[{"model_filename": "m"}]', "test 0: missing or bad field"),
        (BENCH_JSON.replace('"avg_ts": 9.5', '"avg_ts": "fast"'), "test 1: missing or bad"),
    ],
)
def test_parse_bench_json_rejects_bad_output(text, message):
    with pytest.raises(llamacpp.LlamaCppError, match=message):
        llamacpp.parse_bench_json(text)


def test_parse_perplexity_output():
    res = llamacpp.parse_perplexity_output(PPL_OUTPUT)
    assert res.ppl == 10.9876 and res.stderr == 0.84321
    assert res.running == (11.2345, 12.5, 10.9876)
    assert (res.ctx, res.chunks) == (512, 3)
    no_stderr = PPL_OUTPUT.replace(" +/- 0.84321", "")
    assert llamacpp.parse_perplexity_output(no_stderr).stderr is None


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "main: you need at least 1024 tokens to evaluate perplexity with a context of 512\n",
            "text is too short: main: you need at least 1024 tokens",
        ),
        ("[1]11.2,[2]12.5,\n", "no 'Final estimate' line"),
    ],
)
def test_parse_perplexity_output_rejects_bad_output(text, message):
    with pytest.raises(llamacpp.LlamaCppError, match=message):
        llamacpp.parse_perplexity_output(text)


def test_perplexity_windows_score_what_llama_perplexity_scores():
    import torch

    from dart.evaluate.perplexity import score_window

    wins = llamacpp.perplexity_windows(5000, ctx=16, chunks=3)
    assert [(w.begin, w.end, w.score_from, w.prep_len) for w in wins] == [
        (0, 16, 9, 8), (16, 32, 9, 8), (32, 48, 9, 8),
    ]  # fmt: skip
    assert sum(w.tokens for w in wins) == 3 * (16 // 2 - 1)  # llama.cpp's count: ctx - 1 - ctx/2

    class Uniform(torch.nn.Module):  # every token equally likely: NLL = log(vocab) per target
        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 4)})()

    rec = score_window(Uniform(), torch.arange(16) % 4, wins[0].score_from, wins[0].prep_len)
    assert rec["tokens"] == 7 and abs(rec["nll"] - 7 * torch.log(torch.tensor(4.0))) < 1e-5
    with pytest.raises(ValueError, match="num_tokens 40: 3 chunks of 16 tokens need at least 48"):
        llamacpp.perplexity_windows(40, ctx=16, chunks=3)
    with pytest.raises(ValueError, match="need at least 32"):
        llamacpp.perplexity_windows(20, ctx=16, chunks=1)


# ----------------------------------------------------------------------------- command lines


def test_command_lines(tmp_path):
    tools = tmp_path / "tools"
    bench = str(tools / "bin" / "llama-bench")
    assert llamacpp.bench_command(tools, "m.gguf", 2, 128) == [
        bench, "-m", "m.gguf", "-t", "2", "-p", "0", "-n", "128", "-r", "5", "-o", "json",
    ]  # fmt: skip
    assert llamacpp.bench_command(tools, "m.gguf", 1, 0, n_prompt=64, repetitions=2)[5:11] == [
        "-p", "64", "-n", "0", "-r", "2",
    ]  # fmt: skip
    ppl = llamacpp.perplexity_command(tools, "m.gguf", "t.txt", 512, 16, threads=2)
    assert ppl == [
        str(tools / "bin" / "llama-perplexity"),
        "-m", "m.gguf", "-f", "t.txt", "-c", "512", "--chunks", "16", "-t", "2",
    ]  # fmt: skip
    assert "-t" not in llamacpp.perplexity_command(tools, "m.gguf", "t.txt")
    q = llamacpp.quantize_command(tools, "a.gguf", "b.gguf", "Q2_K", None)
    assert q == [str(tools / "bin" / "llama-quantize"), "--allow-requantize", "a.gguf", "b.gguf",
                 "Q2_K"]  # fmt: skip
    assert llamacpp.quantize_command(tools, "a.gguf", "b.gguf", "Q3_K_M", 2)[-1] == "2"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda t: llamacpp.bench_command(t, "m", 0, 32), "threads must be an integer >= 1"),
        (lambda t: llamacpp.bench_command(t, "m", 2, -1), "n_gen must be"),
        (lambda t: llamacpp.bench_command(t, "m", 2, 0, 0), "n_gen and n_prompt are both 0"),
        (lambda t: llamacpp.bench_command(t, "m", 2, 8, repetitions=0), "repetitions must"),
        (lambda t: llamacpp.perplexity_command(t, "m", "f", ctx=511), "ctx must be even"),
        (lambda t: llamacpp.perplexity_command(t, "m", "f", chunks=0), "chunks must be"),
        (lambda t: llamacpp.quantize_command(t, "a", "b", "Q9_K", None), "type 'Q9_K': use"),
        (lambda t: llamacpp.tool_path("llama-cli", t), "tool 'llama-cli': use"),
    ],
)
def test_command_lines_reject_bad_arguments(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)


# ----------------------------------------------------------------------------- fake tools


def _fake_tools(tmp_path: Path, **bodies: str) -> Path:
    """A tool folder whose tools are Python scripts with the given bodies (argv in `args`)."""
    tools = tmp_path / "tools"
    (tools / "bin").mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        script = tools / "bin" / name.replace("_", "-")
        script.write_text(f"#!{sys.executable}\nimport sys, shutil\nargs = sys.argv[1:]\n{body}\n")
        script.chmod(0o755)
    return tools


def test_bench_and_perplexity_run_the_tools(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    tools = _fake_tools(
        tmp_path,
        llama_bench=f"assert args[:2] == ['-m', {str(gguf)!r}]; print({BENCH_JSON!r})",
        llama_perplexity=f"sys.stderr.write({PPL_OUTPUT!r})",
    )
    recs = llamacpp.bench(gguf, 2, 32, tools=tools)
    assert recs[0].avg_ts == 16.0
    res = llamacpp.perplexity(gguf, text, ctx=512, chunks=3, threads=2, tools=tools)
    assert res.ppl == 10.9876
    with pytest.raises(llamacpp.LlamaCppError, match="scored 3 chunks, 16 asked"):
        llamacpp.perplexity(gguf, text, ctx=512, chunks=16, tools=tools)
    with pytest.raises(FileNotFoundError, match="gguf: no such file"):
        llamacpp.bench(tmp_path / "missing.gguf", 2, 32, tools=tools)


def test_tool_failure_names_the_tool_and_shows_its_output(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    tools = _fake_tools(
        tmp_path,
        llama_bench="sys.stderr.write('error: unknown model architecture\\n'); sys.exit(1)",
    )
    with pytest.raises(llamacpp.LlamaCppError, match="exit status 1:\nerror: unknown model"):
        llamacpp.bench(gguf, 2, 32, tools=tools)


def test_quantize_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model.Q4_K_M.gguf"
    src.write_bytes(b"GGUF" + b"x" * 100)
    runs = tmp_path / "runs"
    tools = _fake_tools(
        tmp_path,
        llama_quantize=(
            f"open({str(runs)!r}, 'a').write(' '.join(args) + '\\n')\n"
            "assert args[0] == '--allow-requantize'\n"
            "if args[3] == 'Q2_K': sys.exit('failed to quantize')\n"
            "shutil.copy(args[1], args[2])"
        ),
    )
    out = llamacpp.quantize(src, None, "Q3_K_M", tools=tools)
    assert out == tmp_path / "cache" / "llamacpp" / "quantized" / "model.Q4_K_M.Q3_K_M.gguf"
    assert out.read_bytes() == src.read_bytes() and out.stat().st_mode & 0o777 == 0o644
    assert llamacpp.quantize(src, None, "Q3_K_M", tools=tools) == out  # cached
    assert len(runs.read_text().splitlines()) == 1
    src.write_bytes(b"GGUF" + b"y" * 200)  # another source: made again
    llamacpp.quantize(src, None, "Q3_K_M", tools=tools)
    assert len(runs.read_text().splitlines()) == 2
    with pytest.raises(llamacpp.LlamaCppError, match="quantize failed with exit status 1"):
        llamacpp.quantize(src, None, "Q2_K", tools=tools)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".json"]
    with pytest.raises(ValueError, match="is the source file"):
        llamacpp.quantize(src, src, "Q3_K_M", tools=tools)


# ----------------------------------------------------------------------------- the build


class _FakeProc:
    """Stands in for subprocess.Popen: prints lines, then exits with a status; a `cmake
    --build` that succeeds creates the tools in the build folder."""

    def __init__(self, cmd, fail_step: str | None, **kwargs):
        self.cmd = cmd
        step = "compile" if "--build" in cmd else "configure" if "-S" in cmd else "download"
        self.code = 2 if step == fail_step else 0
        self.stdout = iter([f"{step} line 1\n", f"{step} line 2\n"])
        if step == "compile" and self.code == 0:
            bin_dir = Path(cmd[cmd.index("--build") + 1]) / "bin"
            bin_dir.mkdir(parents=True)
            for tool in llamacpp.TOOLS:
                (bin_dir / tool).write_text("binary")

    def wait(self):
        return self.code


def _fake_sdist(root: Path) -> Path:
    src = root / "src"
    (src / llamacpp.VENDOR_PREFIX).mkdir(parents=True)
    (src / llamacpp.VENDOR_PREFIX / "CMakeLists.txt").write_text("project(llama)\n")
    (src / "llama_cpp_python-0.3.36" / "setup.py").write_text("")
    sdist = root / llamacpp.SDIST_FILE
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    return sdist


@pytest.mark.parametrize("fail_step", [None, "configure", "compile"])
def test_build_runs_the_steps_and_names_a_failing_one(tmp_path, monkeypatch, fail_step):
    monkeypatch.setenv("DART_CACHE", str(tmp_path / "cache"))
    sdist = _fake_sdist(tmp_path)
    monkeypatch.setattr(llamacpp, "_fetch_sdist", lambda root, logs, progress: sdist)
    calls = []

    def popen(cmd, **kwargs):
        calls.append(cmd)
        return _FakeProc(cmd, fail_step, **kwargs)

    monkeypatch.setattr(llamacpp.subprocess, "Popen", popen)
    root = tmp_path / "cache" / "llamacpp"
    if fail_step is None:
        tools = llamacpp.ensure_llamacpp(progress=False)
        assert tools == root / "0.3.36"
        assert all((tools / "bin" / t).read_text() == "binary" for t in llamacpp.TOOLS)
        info = json.loads((tools / "build.json").read_text())
        assert "-DGGML_NATIVE=ON" in info["cmake_options"] and info["llama_cpp_python"] == "0.3.36"
        assert not (tools / "work").exists()  # sources and objects removed
        configure, compile_ = calls
        assert configure[:2] == ["cmake", "-S"] and configure[2].endswith("vendor/llama.cpp")
        assert "-DCMAKE_BUILD_TYPE=Release" in configure and "-DLLAMA_OPENSSL=OFF" in configure
        assert compile_[-4:] == ["--target", *llamacpp.TOOLS]
        assert llamacpp.ensure_llamacpp(progress=False) == tools and len(calls) == 2  # reused
        return
    with pytest.raises(llamacpp.LlamaCppBuildError) as err:
        llamacpp.ensure_llamacpp(progress=False)
    log = root / "logs" / "0.3.36" / f"{fail_step}.log"
    assert err.value.step == fail_step and err.value.log == log
    assert f"failed at step {fail_step!r}: exit status 2" in str(err.value)
    assert f"full log: {log}" in str(err.value) and f"{fail_step} line 2" in str(err.value)
    assert f"{fail_step} line 1" in log.read_text()
    assert not (root / "0.3.36").exists()  # nothing that looks complete
    assert not [p for p in root.iterdir() if p.name.startswith(".0.3.36.build-")]


def test_build_of_a_missing_program_names_the_step(tmp_path, monkeypatch):
    def popen(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(llamacpp.subprocess, "Popen", popen)
    log = tmp_path / "configure.log"
    with pytest.raises(llamacpp.LlamaCppBuildError, match="step 'configure': cannot run 'cmake'"):
        llamacpp._run_step("configure", ["cmake", "-S", "x"], log, progress=False)


def _fake_build(calls: list, delay: float = 0.0, fail: BaseException | None = None):
    def build_into(staging: Path, logs: Path, progress: bool) -> None:
        calls.append(staging)
        (staging / "bin").mkdir()
        for tool in llamacpp.TOOLS:
            (staging / "bin" / tool).write_text("binary")
            time.sleep(delay)
        if fail is not None:
            raise fail

    return build_into


def test_killed_build_is_never_taken_as_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llamacpp, "build_into", _fake_build(calls, fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        llamacpp.ensure_llamacpp(progress=False)
    root = tmp_path / "llamacpp"
    assert not (root / "0.3.36").exists() and not calls[0].exists()
    (root / ".0.3.36.build-killed" / "work").mkdir(parents=True)  # what SIGKILL leaves
    # a folder with the tools but no build record (e.g. copied by hand) is rebuilt
    (root / "0.3.36" / "bin").mkdir(parents=True)
    for tool in llamacpp.TOOLS:
        (root / "0.3.36" / "bin" / tool).write_text("stale")
    monkeypatch.setattr(llamacpp, "build_into", _fake_build(calls))
    tools = llamacpp.ensure_llamacpp(progress=False)
    assert len(calls) == 2 and (tools / "bin" / "llama-bench").read_text() == "binary"
    # a build made on another CPU (GGML_NATIVE) is rebuilt too
    monkeypatch.setattr(llamacpp, "_cpu_fingerprint", lambda: "another-cpu")
    llamacpp.ensure_llamacpp(progress=False)
    assert (
        len(calls) == 3 and json.loads((tools / "build.json").read_text())["cpu"] == "another-cpu"
    )
    assert sorted(p.name for p in root.iterdir()) == ["0.3.36", "0.3.36.lock"]


def test_two_builds_at_once_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(llamacpp, "build_into", _fake_build(calls, delay=0.1))
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(llamacpp.ensure_llamacpp(progress=False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / "llamacpp" / "0.3.36"] * 3


def test_only_the_pinned_version_builds():
    with pytest.raises(ValueError, match="only the pinned llama-cpp-python==0.3.36"):
        llamacpp.ensure_llamacpp(progress=False, version="0.3.2")


# ----------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("model", ["random:tiny", "/some/hf/folder", "gpt2"])
def test_a_model_without_gguf_is_refused(model):
    with pytest.raises(ValueError, match=f"model {model!r} has no GGUF file: llama.cpp runs"):
        llamacpp.packaged_gguf(model)


def test_heldout_text_is_the_eval_split(tmp_path, monkeypatch):
    from dart.assets.data import load_text

    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    path = llamacpp.heldout_text_file("tiny")
    assert path == tmp_path / "llamacpp" / "text" / "tiny-eval.txt"
    text = path.read_text(encoding="utf-8")
    assert text == load_text("tiny", "eval") and text not in load_text("tiny", "calibration")
    mtime = path.stat().st_mtime_ns
    assert llamacpp.heldout_text_file("tiny") == path and path.stat().st_mtime_ns == mtime


def test_file_type_and_weight_bytes_of_a_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(15)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 4), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert llamacpp.file_type(path) == "Q4_K_M"
    assert llamacpp.weight_bytes_per_token(path) == 4 * (16 + 32)  # the embedding is not read


# ----------------------------------------------------------------------------- bench/decode.py


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "random:tiny", "--arms", "llamacpp,dense_compiled"],
         "--arms llamacpp: model 'random:tiny' has no GGUF file"),
        (["--arms", "llamacpp", "--device", "cuda"], "llama.cpp is built for the CPU"),
        (["--arms", "llama.cpp"], "--arms 'llama.cpp': use hf_dense"),
    ],
)  # fmt: skip
def test_decode_bench_refuses_the_llamacpp_arm_without_gguf(tmp_path, monkeypatch, args, message):
    decode = _load("decode")
    monkeypatch.setenv("DART_CACHE", str(tmp_path))  # a build would land here: none may
    monkeypatch.setattr(sys, "argv", ["decode.py", *args])
    with pytest.raises(SystemExit) as err:
        decode.main()
    assert message in str(err.value)
    assert not (tmp_path / "llamacpp").exists()


def test_decode_bench_llamacpp_arm_and_ratio_column(monkeypatch, capsys):
    import torch

    decode = _load("decode")
    seen = []

    def fake_bench(gguf, threads, n_gen, n_prompt=0, repetitions=5, tools=None):
        seen.append((gguf, threads, n_gen, n_prompt, repetitions, tools))
        return llamacpp.parse_bench_json(BENCH_JSON)[:1]

    monkeypatch.setattr(decode, "llamacpp_bench", fake_bench)
    arm = decode.LlamaCppArm(Path("m.gguf"), Path("tools"), 2)
    rec = arm.run(torch.zeros(1, 5, dtype=torch.long), None, 32, 0)
    assert seen == [(Path("m.gguf"), 2, 32, 0, 1, Path("tools"))]
    assert rec["tokens_per_s"] == 16.0 and rec["threads"] == 2
    assert rec["memory_mb"] == 1117320736 / 2**20
    with pytest.raises(ValueError, match="decodes one sequence, got batch 2"):
        arm.run(torch.zeros(2, 5, dtype=torch.long), None, 32, 0)
    records = [
        {"arm": a, "dtype": "float32", "batch": 1, "batch_policy": "per_sequence",
         "sparsity": s, "tokens_per_s": t, "ms_per_token": 1000 / t,
         "speedup_vs_dense_compiled": t / 10.0}
        for a, s, t in (("llamacpp", 0.0, 20.0), ("dense_compiled", 0.0, 10.0),
                        ("dart_gathered_compiled", 0.5, 15.0))
    ]  # fmt: skip
    records[1]["ideal_speedup"] = 1.0
    records[2]["ideal_speedup"] = 1.6
    decode.add_llamacpp_ratios(records)
    assert [r["speedup_vs_llamacpp"] for r in records] == [1.0, 0.5, 0.75]
    decode.print_table(records)
    out = capsys.readouterr().out
    assert "vs llama.cpp" in out and "0.75x" in out
    decode.print_table(records[1:])
    assert "vs llama.cpp" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- quality_speed


def _records() -> list[dict]:
    return [
        {"arm": "llama.cpp Q4_K_M (shipped)", "bytes_read_fraction": 1.0, "ppl": 10.0,
         "tok_s": 15.0, "threads": 2, "family": "llama.cpp", "quant": "Q4_K_M",
         "ppl_stderr": 0.5},
        {"arm": "llama.cpp Q3_K_M", "bytes_read_fraction": 0.8, "ppl": 11.0, "tok_s": 18.0,
         "threads": 2, "family": "llama.cpp", "quant": "Q3_K_M", "ppl_stderr": 0.6},
        {"arm": "dart 50% gathered fp32", "bytes_read_fraction": 0.55, "ppl": 12.5,
         "tok_s": 9.0, "threads": 2},
        {"arm": "dart 50% gathered fp32", "bytes_read_fraction": 0.55, "ppl": 12.5,
         "tok_s": 5.0, "threads": 1, "extra": "kept"},
    ]  # fmt: skip


def test_quality_speed_table_and_chart_from_canned_records(tmp_path):
    qs = _load("quality_speed")
    records = qs.validate_records(_records(), "canned")
    table = qs.markdown_table(records, ["a note"])
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")][1:]
    assert rows[0] == "| dart 50% gathered fp32 | 1 | 0.550 | 12.500 | 5.00 |"
    assert rows[1] == "| llama.cpp Q3_K_M | 2 | 0.800 | 11.000 ± 0.600 | 18.00 |"
    assert table.rstrip().endswith("a note")
    png = qs.plot(records, tmp_path / "chart.png", "title")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("ppl"), "record 0 has no 'ppl'"),
        (lambda r: r.update(threads=2.0), "record 0 key 'threads' is 2.0, expected int"),
        (lambda r: r.update(arm=3), "record 0 key 'arm' is 3, expected str"),
        (lambda r: r.update(tok_s=True), "key 'tok_s' is True, expected float"),
        (lambda r: r.update(tok_s=0.0), "needs tok_s > 0"),
    ],
)
def test_quality_speed_rejects_bad_records(mutate, message):
    qs = _load("quality_speed")
    records = _records()
    mutate(records[0])
    with pytest.raises(ValueError, match=message):
        qs.validate_records(records, "dart.json")
    with pytest.raises(ValueError, match="expected a JSON list"):
        qs.validate_records({"arm": "x"}, "dart.json")


def test_quality_speed_llamacpp_records_interleave_and_reuse_the_shipped_file(
    tmp_path, monkeypatch
):
    qs = _load("quality_speed")
    ll = qs.llamacpp
    shipped = tmp_path / "model.gguf"
    calls = []
    sizes = {"model.gguf": 1000, "Q3_K_M": 800, "Q2_K": 600}

    def fake_bench(gguf, threads, n_gen, n_prompt, repetitions, tools):
        calls.append(("bench", Path(gguf).name, threads))
        rec = ll.parse_bench_json(BENCH_JSON)[0]
        return [ll.BenchRecord(**{**rec.to_dict(), "avg_ts": 10.0 + len(calls)})]

    monkeypatch.setattr(ll, "ensure_llamacpp", lambda: tmp_path / "tools")
    monkeypatch.setattr(ll, "packaged_gguf", lambda model: shipped)
    monkeypatch.setattr(ll, "file_type", lambda path: "Q4_K_M")
    monkeypatch.setattr(ll, "quantize", lambda src, dst, q, tools: tmp_path / q)
    monkeypatch.setattr(ll, "bench", fake_bench)
    monkeypatch.setattr(ll, "weight_bytes_per_token", lambda path: sizes[Path(path).name])
    monkeypatch.setattr(
        ll,
        "perplexity",
        lambda gguf, text, ctx, chunks, threads, tools: ll.PerplexityResult(
            ppl=20.0 - sizes[Path(gguf).name] / 100, stderr=0.1, running=(), ctx=ctx,
            chunks=chunks,
        ),
    )  # fmt: skip
    recs = qs.llamacpp_records("m", ["Q4_K_M", "Q3_K_M", "Q2_K"], [1, 2], 32, 2, tmp_path, 512, 16)
    # round 1 runs every type and thread count, then round 2
    assert [c[1:] for c in calls[:6]] == [("model.gguf", 1), ("model.gguf", 2), ("Q3_K_M", 1),
                                          ("Q3_K_M", 2), ("Q2_K", 1), ("Q2_K", 2)]  # fmt: skip
    assert len(calls) == 12
    by = {(r["quant"], r["threads"]): r for r in recs}
    assert by["Q4_K_M", 1]["arm"] == "llama.cpp Q4_K_M (shipped)"
    assert by["Q4_K_M", 1]["tok_s"] == (11.0 + 17.0) / 2  # median of the two rounds
    assert by["Q2_K", 2]["bytes_read_fraction"] == 0.6 and by["Q2_K", 2]["ppl"] == 14.0
    qs.validate_records(recs, "llama.cpp records")  # the same schema as dart's
