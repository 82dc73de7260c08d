"""scripts/study.py: the grid of issue 12's study, one fingerprinted folder per point, resuming,
and a changed setting never reusing records."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_assets import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


study = _study()


def test_grid_points_are_unique_and_griffin_is_not_duplicated():
    points = study.study_grid([0.5, 0.7], max_ranking_prune=0.7)
    keys = [(p.name, p.total_prune) for p in points]
    assert len(keys) == len(set(keys))
    names = {p.name for p in points}
    assert "dart-nl2-uniform" not in names  # that is GRIFFIN (normalised statistic, uniform k)
    assert {"dense", "griffin", "static", "dart-l2-uniform", "dart-nl2-cap10"} <= names
    assert {p.total_prune for p in points if "-max-" in p.name} == {0.7}
    cap = next(p for p in points if p.name == "dart-l2-cap10")
    config = cap.config("masked", 0)
    assert config.budget.cap_margin == 0.1 and config.statistic == "l2"
    stream = study.stream_grid([0.5], {"statistic": "normalized_l2"}, [0, 32], [1, 2])
    drift = {p.name: p.config("masked", 0) for p in stream if p.name.startswith("dart-R")}
    assert set(drift) == {"dart-R0-p1", "dart-R0-p2", "dart-R32-p1", "dart-R32-p2"}
    assert drift["dart-R32-p2"].drift.retrace_tokens == 32
    assert drift["dart-R32-p2"].drift.pressure_trigger == 2
    assert drift["dart-R32-p2"].statistic == "normalized_l2"
    nodrift = next(p for p in stream if p.name == "dart-nodrift").config("masked", 0)
    assert nodrift.drift.enabled is False and nodrift.statistic == "normalized_l2"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _run(folder, out, *extra):
    argv = ["--model", str(folder), "--corpora", "tiny", "--max-tokens", "64", "--window", "32",
            "--stride", "16", "--calibration-tokens", "16", "--prunes", "0.5",
            "--backend", "masked", "--out", str(out), *extra]  # fmt: skip
    assert study.main(argv) == 0
    return json.loads((out / "ppl_calibration.json").read_text())


def test_ppl_grid_resumes_and_a_changed_setting_gets_its_own_folder(tiny_folder, tmp_path):
    out = tmp_path / "study"
    only = ["--only", "dense,griffin,dart-l2-auto,dart-nl2-auto"]
    first = _run(tiny_folder, out, *only)
    assert [s["name"] for s in first] == ["dense", "griffin", "dart-l2-auto", "dart-nl2-auto"]
    folders = {s["name"]: Path(s["folder"]) for s in first}
    assert len({f.name.rsplit("-", 1)[1] for f in folders.values()}) == 4  # four fingerprints
    assert first[2]["perplexity"] != first[3]["perplexity"]
    lines = {n: (f / "samples.jsonl").read_text() for n, f in folders.items()}
    assert all(len(v.splitlines()) == 3 for v in lines.values())  # 64 tokens: 3 windows
    again = _run(tiny_folder, out, *only)
    assert again == first  # nothing rescored
    assert {n: (f / "samples.jsonl").read_text() for n, f in folders.items()} == lines
    # the same name with another setting: a new folder, scored afresh
    a = _run(tiny_folder, out, "--only", "x", "--extra", 'x={"budget": {"cap_margin": 0.05}}')
    b = _run(tiny_folder, out, "--only", "x", "--extra", 'x={"budget": {"cap_margin": 0.3}}')
    assert a[0]["folder"] != b[0]["folder"] and a[0]["folder"] not in folders.values()
    assert len((Path(b[0]["folder"]) / "samples.jsonl").read_text().splitlines()) == 3


def test_generation_metrics():
    assert study.lcs_f1([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert study.lcs_f1([1, 2, 3, 4], [5, 6, 7, 8]) == 0.0
    assert study.lcs_f1([1, 9, 2, 3], [1, 2, 3, 7]) == pytest.approx(2 * 3 / 8)
    assert study.lcs_f1([], [1]) == 0.0
    assert study.repeated_ngrams([1, 2, 3, 4, 5, 6]) == 0.0
    assert study.repeated_ngrams([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)
    assert study.repeated_ngrams([1, 2]) == 0.0


def test_gen_task_compares_each_arm_with_the_dense_text_and_resumes(tiny_folder, tmp_path):
    out = tmp_path / "study"
    argv = ["--task", "gen", "--model", str(tiny_folder), "--corpora", "tiny", "--documents", "2",
            "--prompt-tokens", "12", "--gen-tokens", "6", "--prunes", "0.5", "--backend",
            "masked", "--only", "dense,griffin,dart-nl2-sblend50", "--out", str(out)]  # fmt: skip
    assert study.main(argv) == 0
    first = json.loads((out / "gen_calibration.json").read_text())
    dense, griffin, dart = first
    assert dense["rouge_l_vs_dense"] == 1.0 and dense["repeated_4grams"] >= 0.0
    assert all(len(t) == 6 for s in first for t in s["item_new_tokens"])  # EOS suppressed
    for s in (griffin, dart):
        pairs = zip(s["item_new_tokens"], dense["item_new_tokens"], strict=True)
        exp = [study.lcs_f1(a, b) for a, b in pairs]
        assert s["item_rouge_l"] == pytest.approx(exp)
        assert s["nominal_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert study.main(argv) == 0  # resumes: nothing regenerated
    assert json.loads((out / "gen_calibration.json").read_text()) == first
    with pytest.raises(SystemExit, match="dense point must run first"):
        study.main([*argv[:-4], "--only", "griffin", "--out", str(out)])
