"""Generation records: padding, per-sequence masks, the compiled loop gives the same tokens."""

from __future__ import annotations

import pytest
import torch
from tiny_assets import tiny_tokenizer
from tiny_models import random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.evaluate import (
    generate_batch,
)
from dart.runtime.fast import FastGenerator


def test_generate_batch_records_with_padding():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = [
        {"id": "a", "prompt": random_ids(1, 6, 0)[0].tolist()},
        {"id": "b", "prompt": random_ids(1, 10, 1)[0].tolist()},
    ]
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    recs = generate_batch(model, items, 6, 0, None, handle, decode=tok.decode)
    stats = handle.stats()
    handle.detach()
    assert [r["id"] for r in recs] == ["a", "b"]
    assert all(len(r["new_tokens"]) == 6 and isinstance(r["text"], str) for r in recs)
    assert recs[1]["prompt_tokens"] == 10 and stats["sequences"] == 2
    # alone, sequence "a" generates the same tokens (per-sequence masks, padding excluded)
    handle = dart.attach(model, DARTConfig(layer_topk="all:0.5", drift={"window": 2}))
    alone = generate_batch(model, items[:1], 6, 0, None, handle)
    handle.detach()
    assert alone[0]["new_tokens"] == recs[0]["new_tokens"]
    assert recs[0]["trace"] and all(len(t) == 3 for t in recs[0]["trace"])


def test_generate_batch_in_the_fast_loop_equals_hf_generate():
    model = tiny_model("llama")
    items = [
        {"id": "a", "prompt": random_ids(1, 6, 0)[0].tolist()},
        {"id": "b", "prompt": random_ids(1, 10, 1)[0].tolist()},
    ]
    cfg = DARTConfig(layer_topk="all:0.5", drift={"window": 2})
    handle = dart.attach(model, cfg)
    ref = generate_batch(model, items, 12, 0, None, handle)
    handle.detach()
    handle = dart.attach(model, cfg)
    fast = FastGenerator(model, handle, max_len=32, compile=False)
    recs = generate_batch(model, items, 12, 0, None, handle, fast=fast)
    handle.detach()
    assert any(r["events"] for r in ref), "the test needs a drift re-trace"
    for r, f in zip(ref, recs, strict=True):
        assert (f["new_tokens"], f["events"]) == (r["new_tokens"], r["events"])
        # similarities agree up to float rounding (static vs dynamic KV cache attention)
        flat = [torch.tensor(rec["trace"], dtype=torch.float64) for rec in (f, r)]
        torch.testing.assert_close(*flat, rtol=0, atol=1e-5)


def test_min_new_tokens_suppresses_eos_and_is_refused_by_the_compiled_loop():
    model = tiny_model("llama", seed=0).eval()
    item = {"id": "a", "prompt": random_ids(1, 6, 3)[0].tolist()}
    # EOS = the token greedy decoding writes first: unsuppressed, the row ends there
    first = generate_batch(model, [item], 1, pad_token_id=0, eos_token_id=None)[0]["new_tokens"]
    eos = first[0]
    plain = generate_batch(model, [item], 5, pad_token_id=0, eos_token_id=eos)[0]["new_tokens"]
    assert plain == [eos]
    held = generate_batch(model, [item], 5, pad_token_id=0, eos_token_id=eos, min_new_tokens=5)
    assert len(held[0]["new_tokens"]) == 5 and eos not in held[0]["new_tokens"]
    with pytest.raises(ValueError, match="min_new_tokens is not supported by the compiled"):
        generate_batch(model, [item], 5, 0, eos, fast=object(), min_new_tokens=5)
