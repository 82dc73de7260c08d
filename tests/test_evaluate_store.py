"""Per-sample JSONL records: resume keys, torn lines, one file per rank."""

from __future__ import annotations

import json

from dart.evaluate import (
    RecordStore,
)


def test_record_store_resume_and_torn_line(tmp_path):
    store = RecordStore(tmp_path)
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x1", "v": 1}])
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x2", "v": 2}], rank=1)
    with open(store.path(), "a") as f:
        f.write('{"method": "dart", "total_prune": 0.5, "id": "x3", "v"')  # torn write
    assert store.done() == {("dart", 0.5, "x1"), ("dart", 0.5, "x2")}
    store.append([{"method": "dart", "total_prune": 0.5, "id": "x3", "v": 3}])
    assert {r["id"] for r in store} == {"x1", "x2", "x3"}
    assert len(store.records(method="dart", total_prune=0.5)) == 3
    lines = store.path().read_text().splitlines()
    assert json.loads(lines[-1])["id"] == "x3"
