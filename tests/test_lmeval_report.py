"""dart.lmeval.report: the side-by-side table and figure of a dart.lmeval results folder."""

from __future__ import annotations

import json

import pytest

from dart.lmeval.report import (
    MAX_TASK_ROWS,
    POOLED_TASK,
    comparison_table,
    load_lmeval_metrics,
    plot_comparison,
)


def _rec(task, method, prune, metric, value, stderr=None, n=10):
    arm = {"method": method, "base_method": method, "total_prune": prune, "release_step": None}
    return {"task": task, **arm, "metric": metric, "value": value, "stderr": stderr, "n": n}


def _metrics(tasks=("boolq", "rte")):
    """Dense, GRIFFIN and DART at 0.7 with distinct values per (task, arm)."""
    out = []
    for i, task in enumerate([*tasks, POOLED_TASK]):
        out.append(_rec(task, "dense", 0.0, "acc", 0.80 - 0.01 * i, 0.05))
        for k in ("ffn_sparsity", "weight_bytes_sparsity"):
            out.append(_rec(task, "dense", 0.0, k, 0.0))
        for arm, base in (("griffin", 0.70), ("dart", 0.60)):
            out.append(_rec(task, arm, 0.7, "acc", base - 0.01 * i, 0.05))
            out.append(_rec(task, arm, 0.7, "acc_minus_dense", base - 0.80, 0.04))
            out.append(_rec(task, arm, 0.7, "ffn_sparsity", 0.7))
            out.append(_rec(task, arm, 0.7, "weight_bytes_sparsity", 0.52))
        out.append(_rec(task, "dart", 0.7, "acc_minus_griffin", -0.10, 0.03))
    return out


def test_table_rows_columns_and_intervals():
    text = comparison_table(_metrics())
    lines = text.splitlines()
    assert lines[0] == (
        "| task | n | dense | griffin | dart | griffin − dense | dart − dense | dart − griffin |"
    )
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| boolq",
        "| rte",
        f"| **{POOLED_TASK} (pooled)**",
    ]
    first = rows[0].split(" | ")
    assert first[2:5] == ["0.800 ± 0.098", "0.700 ± 0.098", "0.600 ± 0.098"]
    assert first[5:8] == ["-0.100 ± 0.078", "-0.200 ± 0.078", "-0.100 ± 0.059 |"]
    assert "dart@0.7: 0.700 of FFN neurons, 0.520 of weight bytes per token" in text
    assert "dense@" not in text  # the dense arm has no sparsity note


def test_table_pools_many_tasks_and_names_sparsities():
    many = [f"mmlu_{i}" for i in range(MAX_TASK_ROWS + 1)]
    metrics = _metrics(many)
    metrics += [_rec(POOLED_TASK, "dart", 0.5, "acc", 0.5, 0.05)]
    text = comparison_table(metrics)
    body = [ln for ln in text.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    assert len(body) == 1 and body[0].startswith(f"| **{POOLED_TASK}")
    assert "dart@0.5" in text.splitlines()[0] and "dart@0.7" in text.splitlines()[0]


def test_unknown_metric_names_the_ones_present():
    with pytest.raises(ValueError, match=r"'f1'.*\['acc', 'ffn_sparsity'"):
        comparison_table(_metrics(), "f1")


def test_figure_and_folder(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    metrics = load_lmeval_metrics(tmp_path)
    path = plot_comparison(tmp_path / "fig.png", metrics, title="t")
    assert path.stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="dart.lmeval run"):
        load_lmeval_metrics(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a dart.lmeval metrics list"):
        load_lmeval_metrics(tmp_path / "bad")


def test_report_command(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from dart.lmeval import main

    (tmp_path / "metrics.json").write_text(json.dumps(_metrics()))
    main(["report", str(tmp_path), "--figure", str(tmp_path / "f.png")])
    out = capsys.readouterr().out
    assert "| boolq | 10 | 0.800 ± 0.098" in out and (tmp_path / "f.png").exists()
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--metric", "nope"])
    assert "'nope' is not in these results" in capsys.readouterr().err
