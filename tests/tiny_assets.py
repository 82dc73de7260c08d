"""A tiny character-level tokenizer (vocab 96, matching tests/models.py) and a tiny Llama
saved as a local HF folder, for fast evaluation / Lightning / CLI tests."""

from __future__ import annotations

from pathlib import Path

from tiny_models import VOCAB, tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "\n"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    chars = [chr(c) for c in range(32, 32 + VOCAB - len(SPECIALS))]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tok.padding_side = "left"
    return tok


def save_tiny(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama (max 4096 positions) + the tiny tokenizer in ``folder``."""
    model = tiny_model("llama", seed=seed, attn="sdpa")
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
