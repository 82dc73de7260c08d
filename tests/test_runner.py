"""dart.runtime.runner without a package: the greedy loop over stand-in programs, padding, EOS
trim."""

from __future__ import annotations

import pytest
import torch

from dart.runtime.runner import greedy_generate, left_pad, trim_at_eos

VOCAB = 8


def _programs(script: list[list[int]]):
    """Stand-in (prefill, decode): row b emits script[b][t] at step t; the state counts steps
    and the positions it is given are recorded."""
    seen = []

    def logits_for(t):
        ids = torch.tensor([row[t] for row in script])
        return torch.nn.functional.one_hot(ids, VOCAB).float()

    def prefill(ids, mask, counter):
        counter.fill_(0)
        return logits_for(0), torch.zeros(len(script), 2, dtype=torch.long)

    def decode(token, position, cache_position, idx, counter):
        counter += 1
        seen.append((position[:, 0].tolist(), int(cache_position)))
        return [logits_for(int(counter))]  # an AOTInductor package returns a list

    return prefill, decode, seen


def test_greedy_loop_feeds_positions_and_stops_once_every_row_ended():
    eos = 7
    prefill, decode, seen = _programs([[1, 7, 3, 4, 5], [2, 3, 7, 4, 5]])
    ids, mask = left_pad([[5, 6, 4], [5]], 3, pad_id=0)
    counter = torch.zeros((), dtype=torch.long)
    result = greedy_generate(prefill, decode, ids, mask, [counter], 5, eos_token_id=eos)
    # row 0 ended at step 1 (EOS repeated after it), row 1 at step 2: no step after that
    assert result.tokens.tolist() == [[1, 7, 7], [2, 3, 7]]
    assert result.decode_steps == 2 and int(counter) == 2
    assert seen == [([3, 1], 3), ([4, 2], 4)]  # positions skip left padding
    assert [trim_at_eos(r, eos) for r in result.tokens.tolist()] == [[1, 7], [2, 3, 7]]
    full = greedy_generate(prefill, decode, ids, mask, [counter], 5)
    assert full.tokens.tolist() == [[1, 7, 3, 4, 5], [2, 3, 7, 4, 5]]


def test_left_pad_and_trim():
    ids, mask = left_pad([[4, 5], [6]], 3, pad_id=9)
    assert ids.tolist() == [[9, 4, 5], [9, 9, 6]] and mask.tolist() == [[0, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="1..3 tokens"):
        left_pad([[1, 2, 3, 4]], 3, pad_id=0)
    with pytest.raises(ValueError, match="1..3 tokens"):
        left_pad([[]], 3, pad_id=0)
    assert trim_at_eos([3, 2, 5, 2], 2) == [3, 2]
    assert trim_at_eos([3, 5], 2) == [3, 5] and trim_at_eos([3, 2], None) == [3, 2]


def test_a_token_count_below_one_is_refused():
    """The loop always emits the prefill's token: 0 or a negative count is an error, in the
    loop and in `scripts/run_exported.py` before any package is read (issue 24.11)."""
    import runpy
    from pathlib import Path

    prefill, decode, _ = _programs([[1, 2]])
    ids, mask = left_pad([[5]], 1, pad_id=0)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"max_new_tokens must be at least 1, got {bad}"):
            greedy_generate(prefill, decode, ids, mask, [torch.zeros(())], bad)
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_exported.py"
    run = runpy.run_path(str(script))["main"]
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            run(["no-such-package", "--prompt-ids", "1,2", "--max-new-tokens", bad])
        assert e.value.code == 2  # argparse: the flag is named, no package is opened
