"""The `dart` CLI: flags from the option dataclasses, YAML configs, end-to-end runs of every
task on a tiny local model, resume after an interruption, `dart report`, `dart demo`."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny_assets import save_tiny

from dart.assets.data import load_text_file
from dart.cli import build_parser, main
from dart.core.config import ConfigError
from dart.evaluate import RecordStore
from dart.evaluate.tasks import TASKS
from dart.experiment import RunOptions
from dart.lightning import StopAfter
from dart.options import resolve_options
from dart.report import load_metrics


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _resolve(argv):
    """(RunOptions, task options) of an ``eval`` command line, as the CLI resolves them."""
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    return resolve_options(given, RunOptions, TASKS[args._task].options)


def test_parse_flags_and_defaults():
    run, ppl = _resolve(
        ["eval", "ppl", "--methods", "dense,dart", "--total-prune", "0.5,0.7", "--window", "64"]
    )
    assert run.methods == ["dense", "dart"] and run.total_prune == [0.5, 0.7] and ppl.window == 64
    run, ppl = _resolve(["eval", "ppl", "--max-tokens", "100"])
    assert ppl.max_tokens == 100 and ppl.stride == 256 and run.model == "smollm2-135m"
    assert run.methods == ["dense", "static", "griffin", "dart"] and run.total_prune == [0.5]
    _, mmlu = _resolve(
        ["eval", "mmlu", "--leaky", "--shots", "0", "--subjects", "anatomy,virology"]
    )
    assert mmlu.leaky is True and mmlu.shots == 0 and mmlu.subjects == ["anatomy", "virology"]
    _, gen = _resolve(["eval", "generate", "--prompt", "a, b", "--prompt", "c", "--no-chat"])
    assert gen.prompts == ["a, b", "c"] and gen.chat is False  # a prompt is never comma-split
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "mmlu", "--shots", "7"])
    with pytest.raises(SystemExit):  # a task's flag on another task
        build_parser().parse_args(["eval", "mmlu", "--window", "7"])
    with pytest.raises(ConfigError, match="--total-prune: 'x' is not a valid float"):
        _resolve(["eval", "ppl", "--total-prune", "0.5,x"])


def test_yaml_config_then_flags_override(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"methods": ["dense", "dart"], "total_prune": [0.5, 0.7], "window": 32, "out": "x"}
        )
    )
    run, ppl = _resolve(["eval", "ppl", "--config", str(cfg), "--window", "16"])
    assert run.methods == ["dense", "dart"] and run.total_prune == [0.5, 0.7]
    assert ppl.window == 16 and run.out == "x"  # the flag wins over the file
    cfg.write_text("windw: 3\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "ppl", "--config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown keys 'windw'" in err and "window" in err  # names what is accepted
    cfg.write_text("window: many\n")
    with pytest.raises(ConfigError, match="window: 'many' is not a valid int"):
        _resolve(["eval", "ppl", "--config", str(cfg)])


def test_shipped_configs_resolve():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        task = f.stem.split("_")[0]
        run, _ = resolve_options({"config": str(f)}, RunOptions, TASKS[task].options)
        assert run.methods and run.out


def test_python_dash_m_dart_is_the_dart_command():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dart", "eval", "ppl", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "usage: dart eval ppl" in out and "--window" in out


def _ppl_argv(folder, out, *extra):
    return [
        "eval",
        "ppl",
        "--model",
        str(folder),
        "--methods",
        "dense,static,dart",
        "--total-prune",
        "0.5,0.7",
        "--max-tokens",
        "96",
        "--window",
        "32",
        "--stride",
        "16",
        "--calibration-tokens",
        "64",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_end_to_end_ppl_resume_and_report(tiny_folder, tmp_path):
    out = tmp_path / "ppl"
    with pytest.raises(StopAfter):  # interrupted after 3 windows of the first arm
        main(_ppl_argv(tiny_folder, out, "--stop-after", "3"))
    assert len(list(RecordStore(out))) == 3
    assert main(_ppl_argv(tiny_folder, out)) == 0
    recs = list(RecordStore(out))
    keys = [(r["method"], r["total_prune"], r["id"]) for r in recs]
    assert len(keys) == len(set(keys)) == 5 * 5  # 5 windows x (dense + 2 static + 2 dart)
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 25  # nothing was recomputed or written twice
    timings = json.loads((out / "timings.json").read_text())
    assert timings["dense@0.0"]["samples"] == 2  # the rerun did only the missing windows
    metrics = load_metrics(out)
    ppl = {
        (m["method"], m["total_prune"]): m["value"] for m in metrics if m["metric"] == "perplexity"
    }
    assert set(ppl) == {
        ("dense", 0.0),
        ("static", 0.5),
        ("static", 0.7),
        ("dart", 0.5),
        ("dart", 0.7),
    }
    for name in ("config.yaml", "log.txt", "stats.json", "perplexity.png", "table.md"):
        assert (out / name).exists(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["window"] == 32 and cfg["task"] == "ppl" and cfg["command"].startswith("dart eval")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dart@0.7"]["nominal_sparsity"] == pytest.approx(0.7, abs=0.02)
    # the records hold the sparsity that ran, per sample and per arm
    dart7 = [r for r in recs if (r["method"], r["total_prune"]) == ("dart", 0.7)]
    assert all(r["nominal_sparsity"] == pytest.approx(0.7, abs=0.02) for r in dart7)
    nominal = {
        (m["method"], m["total_prune"]): m["value"]
        for m in metrics
        if m["metric"] == "nominal_sparsity"
    }
    assert nominal[("dense", 0.0)] == 0.0
    assert nominal[("dart", 0.7)] == pytest.approx(0.7, abs=0.02)
    # a third run finds everything done and only recomputes the metrics
    assert main(_ppl_argv(tiny_folder, out)) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 25
    rep = tmp_path / "report"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    text = (rep / "report.md").read_text()
    assert "| ppl | dart | 0.70 |" in text and (rep / "ppl-perplexity.png").exists()


def test_end_to_end_mmlu_summarize_drift(tiny_folder, tmp_path):
    common = ["--model", str(tiny_folder), "--quiet", "--total-prune", "0.5"]
    assert (
        main(
            [
                "eval",
                "mmlu",
                "--methods",
                "dense,griffin",
                "--shots",
                "0",
                "--limit",
                "3",
                "--out",
                str(tmp_path / "m"),
                *common,
            ]
        )
        == 0
    )
    acc = [m for m in load_metrics(tmp_path / "m") if m["metric"] == "acc_micro"]
    assert {m["method"] for m in acc} == {"dense", "griffin"}
    assert (
        main(
            [
                "eval",
                "summarize",
                "--methods",
                "dense,dart",
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--max-prompt-tokens",
                "64",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "s"),
                *common,
            ]
        )
        == 0
    )
    names = {m["metric"] for m in load_metrics(tmp_path / "s") if m["method"] == "dart"}
    assert {
        "rouge1",
        "rouge2",
        "rougeL",
        "rougeLsum",
        "rougeL_vs_dense",
        "retraces_per_document",
    } <= names
    assert (
        main(
            [
                "eval",
                "drift",
                "--methods",
                "static,dart",
                "--limit",
                "2",
                "--max-new-tokens",
                "12",
                "--release-steps",
                "6",
                "--calibration-tokens",
                "32",
                "--out",
                str(tmp_path / "d"),
                *common,
            ]
        )
        == 0
    )
    drift = load_metrics(tmp_path / "d")
    assert {m["method"] for m in drift} == {"dense", "static", "dart", "dart-r6"}
    assert any(m["metric"] == "token_agreement_second" for m in drift)
    recs = [r for r in RecordStore(tmp_path / "d") if r["method"] == "dart"]
    assert recs and all(r["trace"] for r in recs)


def test_generate_and_text_file(tiny_folder, tmp_path):
    common = ["--model", str(tiny_folder), "--quiet", "--total-prune", "0.5"]
    assert (
        main(
            [
                "generate",
                "--methods",
                "dense,dart",
                "--prompt",
                "Hello there",
                "--prompt",
                "GPUs, then films",
                "--max-new-tokens",
                "5",
                "--no-chat",
                "--out",
                str(tmp_path / "g"),
                *common,
            ]
        )
        == 0
    )
    recs = list(RecordStore(tmp_path / "g"))
    assert sorted((r["method"], r["id"]) for r in recs) == [
        ("dart", "p0"),
        ("dart", "p1"),
        ("dense", "p0"),
        ("dense", "p1"),
    ]
    # --compile: the same greedy tokens from the compiled static-cache loop
    args = ["generate", "--methods", "dense,dart", "--prompt", "Hello there", "--prompt"]
    args += ["GPUs, then films", "--max-new-tokens", "5", "--no-chat", "--compile"]
    assert main([*args, "--out", str(tmp_path / "gc"), *common]) == 0
    compiled = {(r["method"], r["id"]): r["new_tokens"] for r in RecordStore(tmp_path / "gc")}
    assert compiled == {(r["method"], r["id"]): r["new_tokens"] for r in recs}
    text = tmp_path / "t.txt"
    text.write_text("Some local text.\n\nA second paragraph of it, long enough to score. " * 3)
    assert (
        main(
            [
                "eval",
                "ppl",
                "--methods",
                "dense",
                "--text-file",
                str(text),
                "--window",
                "32",
                "--stride",
                "16",
                "--out",
                str(tmp_path / "p"),
                *common,
            ]
        )
        == 0
    )
    ppl = [m for m in load_metrics(tmp_path / "p") if m["metric"] == "tokens"]
    assert ppl[0]["value"] == len(load_text_file(text)) - 1  # char tokenizer: 1 token a char


def test_demo_runs_the_generate_task_and_prints_the_arms(tiny_folder, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tiny_folder), "--max-new-tokens", "6", "--prompt", "Hello"]
    assert main([*argv, "--total-prune", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prompt: Hello" in printed and "STATIC" in printed and "GRIFFIN" in printed
    recs = list(RecordStore(out))
    assert sorted(r["method"] for r in recs) == ["dart", "dense", "griffin", "static"]
    metrics = load_metrics(out)
    assert {m["task"] for m in metrics} == {"generate"}
    nominal = {m["method"]: m["value"] for m in metrics if m["metric"] == "nominal_sparsity"}
    assert nominal["dense"] == 0.0 and nominal["static"] == pytest.approx(0.5, abs=0.02)


def test_lm_eval_subcommand_flags_come_from_lmeval_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "lm-eval", "--help"])
    assert e.value.code == 0 and "--num-fewshot" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # other commands still refuse flags they lack
        main(["eval", "ppl", "--num-fewshot", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --num-fewshot" in capsys.readouterr().err


def _small_ppl(folder, out, *extra):
    return ["eval", "ppl", "--model", str(folder), "--methods", "dense,dart", "--total-prune",
            "0.5", "--max-tokens", "96", "--window", "32", "--stride", "16", "--out", str(out),
            "--quiet", *extra]  # fmt: skip


def test_a_record_with_a_non_numeric_value_is_recomputed_not_fatal(tiny_folder, tmp_path, caplog):
    """A record whose key is sound but whose value is not a number is skipped with a warning
    and recomputed (was: TypeError on every resume); the metrics equal a clean run's
    (issue 24.10)."""
    out = tmp_path / "ppl"
    assert main(_small_ppl(tiny_folder, out)) == 0
    clean = json.loads((out / "metrics.json").read_text())
    lines = (out / "samples.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    lines[1] = json.dumps({**rec, "nll": "oops"})
    rec2 = json.loads(lines[-1])
    lines[-1] = json.dumps({**rec2, "effective_sparsity": None})
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(_small_ppl(tiny_folder, out)) == 0
    assert "samples.jsonl:2: skipped, its values do not aggregate" in caplog.text
    assert f"samples.jsonl:{len(lines)}: skipped, its effective_sparsity is None" in caplog.text
    assert json.loads((out / "metrics.json").read_text()) == clean
    assert len(list(RecordStore(out))) == len(lines)


def test_a_resumed_arms_stats_cover_every_run(tiny_folder, tmp_path):
    """stats.json of an arm interrupted and then resumed counts both runs' work, as one
    uninterrupted run does (was: the last run's samples only)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_small_ppl(tiny_folder, whole, "--methods", "dart")) == 0
    with pytest.raises(StopAfter):
        main(_small_ppl(tiny_folder, split, "--methods", "dart", "--stop-after", "2"))
    assert main(_small_ppl(tiny_folder, split, "--methods", "dart")) == 0
    got = json.loads((split / "stats.json").read_text())["dart@0.5"]
    ref = json.loads((whole / "stats.json").read_text())["dart@0.5"]
    assert got["samples"] == ref["samples"] == 5 and (got["runs"], ref["runs"]) == (2, 1)
    for key in ("mask_builds", "sequences", "decode_passes", "nominal_sparsity"):
        assert got[key] == ref[key], key


def test_a_folder_filled_by_two_runs_is_summarised_whole(tiny_folder, tmp_path):
    """metrics.json and table.md cover every arm of the folder, not only the last run's."""
    out = tmp_path / "ppl"
    assert main(_small_ppl(tiny_folder, out, "--methods", "dense,dart")) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert main(_small_ppl(tiny_folder, out, "--methods", "griffin")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    arms = {(m["method"], m["total_prune"]) for m in metrics}
    assert arms == {("dense", 0.0), ("dart", 0.5), ("griffin", 0.5)}
    assert [m for m in metrics if m["method"] != "griffin"] == first  # recomputed, unchanged
    assert "griffin" in (out / "table.md").read_text()


def test_expected_errors_are_one_line_and_debug_shows_the_traceback(tiny_folder, tmp_path, capsys):
    """Bad input (a negative count, an empty text file), a locked folder and a fingerprint
    mismatch: one `dart: error:` message naming the problem, no traceback; `--debug` raises
    (issue 24.11/12)."""
    from dart.evaluate.store import FingerprintMismatchError, FolderLockedError, RunStore

    def fails(argv, code, *needles):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and "Traceback" not in err, err
        assert "dart: error: " in err, err  # after any progress output
        message = err[err.index("dart: error: ") :]
        assert all(n in message for n in needles), err

    out = tmp_path / "ppl"
    fails(_small_ppl(tiny_folder, out, "--max-tokens", "-5"), 2, "--max-tokens: -5 is below")
    fails(_small_ppl(tiny_folder, out, "--text-file", "/dev/null"), 2, "holds no text")
    with RunStore.open(out):
        fails(_small_ppl(tiny_folder, out), 1, "is in use by another run", "--debug")
        with pytest.raises(FolderLockedError):
            main([*_small_ppl(tiny_folder, out), "--debug"])
    assert main(_small_ppl(tiny_folder, out, "--methods", "dense")) == 0
    other = _small_ppl(tiny_folder, out, "--methods", "dense", "--window", "24")
    fails(other, 1, "holds records of another configuration", "window")
    with pytest.raises(FingerprintMismatchError):
        main(["--debug", *other])
