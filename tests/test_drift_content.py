"""The content-aware attention monitor (`attn_content`): attention mass per key-content cluster."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model

import dart
from dart.core.config import ConfigError, DriftConfig
from dart.core.drift import AttnContentMonitor, AttnProbsMonitor, make_monitor

D, HEADS, RECENT = 32, 2, 16


def _topic_hidden(n: int, topic: int, g: torch.Generator) -> torch.Tensor:
    """`n` attention inputs `[1, n, D]` around a topic's centre (topics far apart)."""
    centre = torch.randn(D, generator=torch.Generator().manual_seed(100 + topic)) * 6.0
    return centre + torch.randn(1, n, D, generator=g)


def _recent_probs(t: int, s: int) -> torch.Tensor:
    """Every query attends uniformly to its last `RECENT` keys: one fixed distance profile."""
    p = torch.zeros(1, HEADS, t, s)
    for i in range(t):
        q = s - t + i
        p[0, :, i, max(0, q - RECENT + 1) : q + 1] = 1.0
    return p / p.sum(-1, keepdim=True)


def _stream(mon, switch_at: int) -> list[bool]:
    """A 40-token prompt of topic 0, then 40 tokens one at a time (topic 1 from `switch_at`);
    whether the monitor fired after each token. The distance profile never changes."""
    g = torch.Generator().manual_seed(0)
    mon.begin_trace(1)
    hidden = _topic_hidden(40, 0, g)
    probs = _recent_probs(40, 40)
    mon.observe((probs, hidden) if isinstance(mon, AttnContentMonitor) else probs)
    mon.finalize_trace()
    fired = []
    for i in range(40):
        s = 41 + i
        x = _topic_hidden(1, 1 if i >= switch_at else 0, g)
        probs = _recent_probs(1, s)
        mon.observe((probs, x) if isinstance(mon, AttnContentMonitor) else probs)
        fired.append(bool(mon.poll()[0]))
    return fired


def test_content_monitor_sees_a_topic_switch_the_distance_monitor_cannot():
    cfg = DriftConfig(signal="attn_content", window=4, content_bits=3)
    mon = make_monitor(cfg)
    assert isinstance(mon, AttnContentMonitor)
    assert not any(_stream(mon, switch_at=40))  # same topic throughout: never fires
    fired = _stream(make_monitor(cfg), switch_at=12)
    assert not any(fired[:12]) and any(fired[12:32])
    distance = make_monitor(DriftConfig(signal="attn_probs", window=4))
    assert isinstance(distance, AttnProbsMonitor) and not any(_stream(distance, 12))


def test_cluster_ids_follow_the_cache_crop_new_sequence_and_unknown_keys():
    mon = make_monitor(DriftConfig(signal="attn_content", content_bits=3))
    mon.begin_trace(2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, D, generator=g)
    mon.observe((torch.softmax(torch.randn(2, HEADS, 6, 6), -1), x))
    first = mon._ids[0].clone()
    assert first.shape == (2, 6) and int(first.max()) < 8
    # a crop-and-recompute: 2 positions dropped, 3 recomputed -> 7 keys, the first 4 kept
    mon.observe((torch.softmax(torch.randn(2, HEADS, 3, 7), -1), torch.randn(2, 3, D)))
    assert mon._ids[0].shape == (2, 7) and torch.equal(mon._ids[0][:, :4], first[:, :4])
    # keys the monitor never saw (cache grew outside it) go to the extra cluster
    mon.observe((torch.softmax(torch.randn(2, HEADS, 1, 10), -1), torch.randn(2, 1, D)))
    assert (mon._ids[0][:, 7:9] == 8).all() and mon._ids[0].shape == (2, 10)
    feat = mon.features([(torch.softmax(torch.randn(2, HEADS, 4, 4), -1), x[:, :4])])
    assert feat.shape == (2, 4, HEADS, 9) and mon._ids[0].shape == (2, 4)  # S == T: new sequence
    torch.testing.assert_close(feat.sum(-1), torch.ones(2, 4, HEADS))
    with pytest.raises(ValueError, match="attn_content"):
        mon.features([(torch.rand(2, 4, 4), x)])


def test_content_bits_is_validated():
    for bad in (0, 13, 2.5):
        with pytest.raises(ConfigError, match="content_bits"):
            DriftConfig(content_bits=bad)


def test_attach_with_attn_content_runs_on_eager_attention_only():
    model = tiny_model("llama", attn="eager")
    cfg = dart.DARTConfig(layer_topk="all:0.5", drift={"signal": "attn_content", "window": 3})
    handle = dart.attach(model, cfg)
    out = model(random_ids(2, 12, 0), use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(9):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    hist = handle.drift_history()
    handle.detach()
    assert len(hist) == 2 and all(len(h) == 3 for h in hist)  # 9 tokens = 3 windows
    assert all(0.0 <= sim <= 1.0 for h in hist for _, sim, _ in h)
    sdpa = tiny_model("llama", attn="sdpa")
    handle = dart.attach(sdpa, cfg)
    with pytest.raises(RuntimeError, match="eager"):
        sdpa(random_ids(1, 5, 0))
    handle.detach()
