"""The tuning study in the package (dart.evaluate.study, dart.study): its grid, one fingerprinted
folder per point run through the driver's per-arm function, resuming (also folders written by
the former scripts/study.py), and a changed setting never reusing records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_assets import save_tiny

from dart import study
from dart.evaluate import study as grid
from dart.evaluate.metrics import rouge_scores
from dart.evaluate.store import RecordStore


def test_grid_points_are_unique_and_griffin_is_not_duplicated():
    points = grid.study_grid([0.5, 0.7], max_ranking_prune=0.7)
    keys = [(p.name, p.total_prune) for p in points]
    assert len(keys) == len(set(keys))
    names = {p.name for p in points}
    assert "dart-nl2-uniform" not in names  # that is GRIFFIN (normalised statistic, uniform k)
    assert {"dense", "griffin", "static", "dart-l2-uniform", "dart-nl2-cap10"} <= names
    assert {p.total_prune for p in points if "-max-" in p.name} == {0.7}
    cap = next(p for p in points if p.name == "dart-l2-cap10")
    config = cap.config("masked", 0)
    assert config.budget.cap_margin == 0.1 and config.statistic == "l2"
    assert cap.arm.label == "dart-l2-cap10" and cap.arm.method == "dart"  # records' name
    base = {"statistic": "normalized_l2", "drift": {"window": 3}}
    stream = grid.with_base(grid.stream_grid([0.5], [0, 32], [1, 2]), base)
    drift = {p.name: p.config("masked", 0) for p in stream if p.name.startswith("dart-R")}
    assert set(drift) == {"dart-R0-p1", "dart-R0-p2", "dart-R32-p1", "dart-R32-p2"}
    assert drift["dart-R32-p2"].drift.retrace_tokens == 32
    assert drift["dart-R32-p2"].drift.pressure_trigger == 2
    assert drift["dart-R32-p2"].statistic == "normalized_l2"
    assert drift["dart-R32-p2"].drift.window == 3  # the point's drift keys over the base's
    griffin = next(p for p in stream if p.name == "griffin").config("masked", 0)
    assert griffin.statistic != "normalized_l2" or griffin.method == "griffin"
    assert next(p for p in stream if p.name == "griffin").overrides == {}  # baselines keep theirs
    nodrift = next(p for p in stream if p.name == "dart-nodrift").config("masked", 0)
    assert nodrift.drift.enabled is False and nodrift.statistic == "normalized_l2"


def test_flags_parse_as_before():
    opts = study.parse_args(["--task", "stream", "--corpora", "wiki,c4", "--prunes", "0.5,0.7",
                             "--retrace", "0,16", "--pressure", "2", "--only", "dense,griffin",
                             "--extra", 'a={"budget": {"cap_margin": 0.1}}', "--extra",
                             'b={"method": "griffin"}', "--switch"])  # fmt: skip
    assert (opts.corpora, opts.prunes, opts.retrace, opts.pressure) == (
        ["wiki", "c4"], [0.5, 0.7], [0, 16], [2])  # fmt: skip
    assert opts.only == ["dense", "griffin"] and opts.switch and len(opts.extra) == 2
    extra = grid.parse_extra(opts.extra, opts.prunes)
    assert [(p.name, p.method, p.total_prune) for p in extra] == [
        ("a", "dart", 0.5),
        ("a", "dart", 0.7),
        ("b", "griffin", 0.5),
        ("b", "griffin", 0.7),
    ]
    with pytest.raises(SystemExit, match="unknown grid points"):
        study.main(["--only", "nope", "--out", "unused"])
    with pytest.raises(SystemExit, match="expected NAME=JSON"):
        study.main(["--extra", "nojson", "--out", "unused"])
    with pytest.raises(SystemExit, match="--dart.drift.window"):
        study.main(["--task", "stream", "--dart.drift.window", "0", "--out", "unused"])
    opts = study.parse_args(["--task", "stream", "--dart.statistic", "normalized_l2",
                             "--dart.budget.uniform_blend", "0.5"])  # fmt: skip
    assert opts.dart == {"statistic": "normalized_l2", "budget": {"uniform_blend": 0.5}}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _run(folder, out, *extra):
    argv = ["--model", str(folder), "--corpora", "tiny", "--max-tokens", "64", "--window", "32",
            "--stride", "16", "--calibration-tokens", "16", "--prunes", "0.5",
            "--backend", "masked", "--out", str(out), *extra]  # fmt: skip
    assert study.main(argv) == 0
    return json.loads((out / "ppl_calibration.json").read_text())


def _scores(summaries):
    return [{k: v for k, v in s.items() if k != "seconds"} for s in summaries]


def test_ppl_grid_resumes_and_a_changed_setting_gets_its_own_folder(tiny_folder, tmp_path):
    out = tmp_path / "study"
    only = ["--only", "dense,griffin,static,dart-l2-auto,dart-nl2-auto"]
    first = _run(tiny_folder, out, *only)
    names = ["dense", "griffin", "static", "dart-l2-auto", "dart-nl2-auto"]
    assert [s["name"] for s in first] == names
    folders = {s["name"]: Path(s["folder"]) for s in first}
    assert len({f.name.rsplit("-", 1)[1] for f in folders.values()}) == 5  # five fingerprints
    assert first[3]["perplexity"] != first[4]["perplexity"]
    assert first[1]["nominal_sparsity"] == pytest.approx(0.5, abs=0.02)
    lines = {n: (f / "samples.jsonl").read_text() for n, f in folders.items()}
    assert all(len(v.splitlines()) == 3 for v in lines.values())  # 64 tokens: 3 windows
    # the records are the driver's: the point's name labels the arm, bound in arms.json
    rec = json.loads(lines["dart-l2-auto"].splitlines()[0])
    assert (rec["method"], rec["base_method"]) == ("dart-l2-auto", "dart")
    arms = json.loads((folders["dart-l2-auto"] / "arms.json").read_text())
    assert arms["dart-l2-auto@0.5"]["statistic"] == "l2"

    again = _run(tiny_folder, out, *only)
    assert _scores(again) == _scores(first)  # nothing rescored
    assert {n: (f / "samples.jsonl").read_text() for n, f in folders.items()} == lines

    # an interrupted point (its last window lost) resumes with that window alone
    torn = folders["dart-nl2-auto"] / "samples.jsonl"
    torn.write_text("".join(lines["dart-nl2-auto"].splitlines(keepends=True)[:2]))
    resumed = _run(tiny_folder, out, "--only", "dart-nl2-auto")
    assert _scores(resumed) == _scores(first[4:])
    assert torn.read_text().splitlines()[:2] == lines["dart-nl2-auto"].splitlines()[:2]
    assert len(torn.read_text().splitlines()) == 3

    # the same name with another setting: a new folder, scored afresh
    a = _run(tiny_folder, out, "--only", "x", "--extra", 'x={"budget": {"cap_margin": 0.05}}')
    b = _run(tiny_folder, out, "--only", "x", "--extra", 'x={"budget": {"cap_margin": 0.3}}')
    assert a[0]["folder"] != b[0]["folder"] and a[0]["folder"] not in folders.values()
    assert len((Path(b[0]["folder"]) / "samples.jsonl").read_text().splitlines()) == 3


def test_folders_of_the_former_script_resume_unchanged(tiny_folder, tmp_path):
    """Records written by scripts/study.py before the move (no arm fields but method and
    total_prune, a ``seconds`` each, no arms.json) are reused: nothing rescored, same values."""
    out = tmp_path / "study"
    only = ["--only", "dense,dart-l2-auto"]
    first = _run(tiny_folder, out, *only)
    for s in first:
        folder = Path(s["folder"])
        old = []
        for r in RecordStore(folder):
            keep = {k: r[k] for k in ("id", "method", "total_prune", "nll", "tokens")}
            old.append({**keep, "nominal_sparsity": r["nominal_sparsity"], "seconds": 0.25})
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
        for name in ("arms.json", "timings.json", "stats.json", "summary.json"):
            (folder / name).unlink(missing_ok=True)
    before = {s["name"]: (Path(s["folder"]) / "samples.jsonl").read_text() for s in first}
    again = _run(tiny_folder, out, *only)
    assert [s["folder"] for s in again] == [s["folder"] for s in first]
    assert _scores(again) == _scores(first)
    assert {s["name"]: (Path(s["folder"]) / "samples.jsonl").read_text() for s in again} == before


def test_gen_task_compares_each_point_with_the_dense_text_and_resumes(tiny_folder, tmp_path):
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
        exp = [rouge_scores(a, b)["rougeL"] for a, b in pairs]  # the one ROUGE, on token ids
        assert s["item_rouge_l"] == exp
        assert s["nominal_sparsity"] == pytest.approx(0.5, abs=0.02)
        assert s["dense_nll"] > 0 and len(s["item_nll"]) == 2
    assert study.main(argv) == 0  # resumes: nothing regenerated
    assert _scores(json.loads((out / "gen_calibration.json").read_text())) == _scores(first)
    with pytest.raises(SystemExit, match="dense point must run first"):
        study.main([*argv[:-4], "--only", "griffin", "--out", str(out)])
    report = tmp_path / "figures"
    assert study.main(["--report", str(report), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Greedy generation (calibration split" in text and "| dart-nl2-sblend50 |" in text
    assert (report / "study-gen-calibration.png").stat().st_size > 0


def test_quantised_weights_score_into_folders_of_their_own(tiny_folder, tmp_path):
    """--weights q8: the same point on quantised weights is another model (its weights' hash),
    so it gets its own folder and its own scores, and resumes there."""
    out = tmp_path / "study"
    fp = _run(tiny_folder, out, "--only", "dense,dart-nl2-auto")
    q8 = _run(tiny_folder, out, "--only", "dense,dart-nl2-auto", "--weights", "q8")
    assert [s["name"] for s in q8] == ["dense", "dart-nl2-auto"]
    for a, b in zip(fp, q8, strict=True):
        assert a["folder"] != b["folder"]
        assert a["perplexity"] != b["perplexity"]
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=0.05)  # q8 is close
    again = _run(tiny_folder, out, "--only", "dense,dart-nl2-auto", "--weights", "q8")
    assert _scores(again) == _scores(q8)
    with pytest.raises(SystemExit):
        study.parse_args(["--weights", "q3"])
