"""`dart report`: the metrics schema, the markdown table and the plots."""

from __future__ import annotations

import pytest

from dart.report import load_metrics, markdown_table, plot_metric_vs_sparsity
from dart.results import write_json


def test_metrics_schema_table_and_plot(tmp_path):
    metrics = [
        {
            "task": "ppl",
            "method": "dense",
            "total_prune": 0.0,
            "metric": "perplexity",
            "value": 9.0,
        },
        {
            "task": "ppl",
            "method": "dart",
            "total_prune": 0.5,
            "metric": "perplexity",
            "value": 12.0,
        },
        {
            "task": "ppl",
            "method": "dart",
            "total_prune": 0.7,
            "metric": "perplexity",
            "value": 20.0,
        },
    ]
    write_json(tmp_path / "metrics.json", metrics)
    assert load_metrics(tmp_path) == metrics
    table = markdown_table(metrics)
    assert "| ppl | dart | 0.50 | 12 |" in table
    assert plot_metric_vs_sparsity(tmp_path / "p.png", metrics, "perplexity").stat().st_size > 0
    write_json(tmp_path / "metrics.json", [{"method": "dart"}])
    with pytest.raises(ValueError, match="lacks"):
        load_metrics(tmp_path)
