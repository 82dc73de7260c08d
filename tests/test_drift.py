import math

import pytest
import torch

from dart.core.config import DriftConfig
from dart.core.drift import (
    AttnOutputMonitor,
    AttnProbsMonitor,
    NullMonitor,
    distance_bucket_features,
    js_similarity,
    make_monitor,
    resolve_watch_layers,
)


def _drift(**overrides) -> DriftConfig:
    """The monitor mechanics pinned down here (hysteresis, per-row polls, window timing) were
    written for a trigger of 2 consecutive low windows: the default before issue 12's study
    made it 3."""
    return DriftConfig(**{"pressure_trigger": 2, **overrides})


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def _naive_tau(x, w, sigma_scale=0.1, floor=0.1):
    """x: [T, d] trace tokens of one sequence."""
    base = x.mean(0)
    k = x.shape[0] // w
    sims = [_cos(x[i * w : (i + 1) * w].mean(0), base) for i in range(k)]
    mu = sum(sims) / k
    sd = math.sqrt(sum((s - mu) ** 2 for s in sims) / (k - 1))
    return base, mu, sd, mu - max(sigma_scale * sd, floor)


def _topic(t, direction, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return direction[None] + noise * torch.randn(t, direction.numel(), generator=g)


def test_baseline_and_threshold_hand_computed():
    torch.manual_seed(0)
    x = torch.randn(11, 3)  # 5 windows of 2 tokens + 1 trailing token (not a window)
    mon = AttnOutputMonitor(_drift(window=2, sigma_scale=3.0, threshold_floor=0.01))
    mon.begin_trace(1, "cpu")
    mon.observe(x[None, :4])
    mon.observe(x[None, 4:5])  # split so a window straddles calls
    mon.observe(x[None, 5:])
    mon.finalize_trace()
    base = x.mean(0)
    sims = [_cos(x[i * 2 : i * 2 + 2].mean(0), base) for i in range(5)]
    mu = sum(sims) / 5
    sd = math.sqrt(sum((s - mu) ** 2 for s in sims) / 4)
    torch.testing.assert_close(mon.baseline[0, 0], base)
    assert float(mon.mu[0]) == pytest.approx(mu, abs=1e-5)
    assert float(mon.sigma[0]) == pytest.approx(sd, abs=1e-5)
    assert float(mon.tau[0]) == pytest.approx(mu - max(3.0 * sd, 0.01), abs=1e-5)
    assert bool(mon.armed[0]) and not bool(mon.tracing[0])


def test_left_padded_trace_matches_unpadded():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 4)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    mon = AttnOutputMonitor(_drift(window=3))
    mon.begin_trace(2)
    mon.observe(x, valid)
    mon.finalize_trace()
    for b, xb in ((0, x[0]), (1, x[1, 5:])):
        base, mu, sd, tau = _naive_tau(xb, 3)
        torch.testing.assert_close(mon.baseline[b, 0], base)
        assert float(mon.tau[b]) == pytest.approx(tau, abs=1e-5)
        assert float(mon.sigma[b]) == pytest.approx(sd, abs=1e-5)


def test_chunk_decimation_matches_subsampled_naive():
    torch.manual_seed(2)
    x = torch.randn(1, 103, 3)  # 51 windows of 2
    mon = AttnOutputMonitor(_drift(window=2), max_chunks=4)
    mon.begin_trace(1)
    for s in range(0, 103, 7):  # uneven calls
        mon.observe(x[:, s : s + 7])
    mon.finalize_trace()
    stride = 16  # smallest power of two with ceil(51 / stride) <= 4
    base = x[0].mean(0)
    sims = [_cos(x[0, i * 2 : i * 2 + 2].mean(0), base) for i in range(0, 51, stride)]
    assert int(mon.chunk_stored[0]) == len(sims) == 4
    mu = sum(sims) / 4
    sd = math.sqrt(sum((s - mu) ** 2 for s in sims) / 3)
    assert float(mon.mu[0]) == pytest.approx(mu, abs=1e-5)
    assert float(mon.sigma[0]) == pytest.approx(sd, abs=1e-5)


def test_short_traces_stay_pending_until_min_windows():
    """Fewer than min_windows complete windows: no baseline yet (not armed, still tracing);
    the row arms as soon as the following tokens complete its windows, from all its tokens."""
    torch.manual_seed(4)
    mon = AttnOutputMonitor(_drift(window=5, min_windows=2))
    mon.begin_trace(3)
    valid = torch.tensor([[True] * 7, [False] * 6 + [True], [False] * 7])
    x = torch.randn(3, 7, 4)
    mon.observe(x, valid)
    mon.finalize_trace()
    assert mon.armed.tolist() == [False] * 3 and mon.pending.tolist() == [True] * 3
    assert mon.tracing.tolist() == [True] * 3
    y = torch.randn(3, 3, 4)
    mon.observe(y)  # row 0: 10 tokens = 2 windows -> armed; rows 1 and 2: 4 and 3 tokens
    assert mon.armed.tolist() == [True, False, False]
    base, mu, sd, tau = _naive_tau(torch.cat([x[0], y[0]]), 5)
    torch.testing.assert_close(mon.baseline[0, 0], base)
    assert float(mon.tau[0]) == pytest.approx(tau, abs=1e-5)
    mon.observe(torch.randn(3, 7, 4))
    assert mon.armed.tolist() == [True, True, True] and not mon.pending.any()
    assert torch.isfinite(mon.tau).all() and (mon.sigma > 0).all()
    assert mon.history()[1] == [] and len(mon.history()[0]) == 1  # watched once armed


@pytest.mark.parametrize("min_windows", [0, 1])
def test_min_windows_is_at_least_two(min_windows):
    with pytest.raises(ValueError, match="DriftConfig.min_windows"):
        _drift(min_windows=min_windows)


def _retrace_one_token(mon, token):
    """What the controller does at a drift event with masking_step=0: restart the row's trace,
    one dense decode pass, mask built (finalize)."""
    mon.begin_trace(1, rows=torch.tensor([True]))
    mon.observe(token[None, None])
    mon.finalize_trace(torch.tensor([True]))


def test_one_token_retrace_keeps_the_previous_threshold():
    """The hair trigger of issue 12: after a one-token re-trace the old rule (mu = 1,
    tau = 1 - floor = 0.9, baseline = that token) fires on the same topic's windows; now the
    previous baseline and threshold stay until the re-trace has min_windows windows."""
    a = torch.zeros(16)
    a[0] = 1.0
    prompt, after = _topic(100, a, 0.2, seed=1), _topic(200, a, 0.2, seed=2)
    one_token_baseline = after[0]
    old_sims = [_cos(after[1 + i * 5 : 6 + i * 5].mean(0), one_token_baseline) for i in range(39)]
    assert sum(s < 0.9 for s in old_sims) > 30  # the old rule's pressure would fire repeatedly
    mon = AttnOutputMonitor(_drift())
    mon.begin_trace(1)
    mon.observe(prompt[None])
    mon.finalize_trace()
    tau_prompt, base_prompt = float(mon.tau[0]), mon.baseline[0, 0].clone()
    _retrace_one_token(mon, after[0])
    assert float(mon.tau[0]) == tau_prompt and torch.equal(mon.baseline[0, 0], base_prompt)
    fired = []
    for t in range(1, 200):
        mon.observe(after[None, t : t + 1])
        fired.append(bool(mon.poll()[0]))
    assert not any(fired)
    assert not mon.pending.any() and float(mon.tau[0]) != tau_prompt  # re-armed: new statistics
    torch.testing.assert_close(mon.baseline[0, 0], after[:10].mean(0))  # its first 2 windows
    assert float(mon.tau[0]) > 0.7


@pytest.mark.parametrize("switch_at", [1, 60])
def test_topic_switch_after_a_retrace_still_fires(switch_at):
    """A real switch fires while the re-trace is pending (old baseline) and after it armed."""
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    mon = AttnOutputMonitor(_drift())
    mon.begin_trace(1)
    mon.observe(_topic(100, a, 0.2, seed=1)[None])
    mon.finalize_trace()
    stream = torch.cat([_topic(switch_at, a, 0.2, seed=2), _topic(40, b, 0.2, seed=3)])
    _retrace_one_token(mon, stream[0])
    fired = []
    for t in range(1, stream.shape[0]):
        mon.observe(stream[None, t : t + 1])
        fired.append(bool(mon.poll()[0]))
    first = fired.index(True) + 1
    assert switch_at <= first <= switch_at + 15


def _run(mon, trace, gen, step=1, valid_gen=None):
    mon.begin_trace(trace.shape[0])
    mon.observe(trace)
    mon.finalize_trace()
    fired = []
    for s in range(0, gen.shape[1], step):
        v = None if valid_gen is None else valid_gen[:, s : s + step]
        mon.observe(gen[:, s : s + step], v)
        fired.append(mon.poll())
    return torch.stack(fired, 1)  # [B, steps]


def test_single_topic_never_triggers():
    d = torch.zeros(16)
    d[0] = 1.0
    mon = AttnOutputMonitor(_drift())
    fired = _run(mon, _topic(60, d, seed=1)[None], _topic(500, d, seed=2)[None])
    assert not fired.any()
    h = mon.history()[0]
    assert len(h) == 100 and all(s > t for _, s, t in h)
    assert [step for step, _, _ in h[:3]] == [65, 70, 75]  # counted from the trace start


def test_switching_topic_triggers_within_few_windows():
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    gen = torch.cat([_topic(100, a, seed=3), _topic(100, b, seed=4)])[None]
    fired = _run(AttnOutputMonitor(_drift()), _topic(60, a, seed=5)[None], gen)[0]
    first = int(fired.nonzero()[0, 0])
    assert 100 <= first < 100 + 3 * 5
    assert not fired[:100].any()


def test_hysteresis():
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    w = 5
    good, bad = _topic(w, a, 0.0), _topic(w, b, 0.0)
    # bad, good, bad, good: pressure 1, 0, 1, 0 -> never fires with trigger 2
    gen = torch.cat([bad, good, bad, good])[None]
    mon = AttnOutputMonitor(_drift(window=w))
    assert not _run(mon, _topic(20, a, 0.0)[None], gen).any()
    # bad, bad -> fires at the second bad window, then pressure resets
    gen = torch.cat([bad, bad, bad])[None]
    fired = _run(mon, _topic(20, a, 0.0)[None], gen)[0]
    assert fired.nonzero()[:, 0].tolist() == [2 * w - 1]
    assert int(mon.pressure[0]) == 1
    # trigger 1 fires at the first bad window
    mon1 = AttnOutputMonitor(_drift(window=w, pressure_trigger=1))
    fired = _run(mon1, _topic(20, a, 0.0)[None], torch.cat([good, bad])[None])[0]
    assert fired.nonzero()[:, 0].tolist() == [2 * w - 1]


def test_per_sequence_independence_and_multi_token_equivalence():
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    trace = torch.stack([_topic(40, a, seed=6), _topic(23, b, seed=7).repeat(2, 1)[:40]])
    gen = torch.stack(
        [torch.cat([_topic(50, a, seed=8), _topic(50, b, seed=9)]), _topic(100, b, seed=10)]
    )
    mon = AttnOutputMonitor(_drift())
    fired = _run(mon, trace, gen)
    assert fired[0].any() and not fired[1].any()
    hist = mon.history()
    for row in range(2):
        solo = AttnOutputMonitor(_drift())
        f_solo = _run(solo, trace[row : row + 1], gen[row : row + 1])
        assert torch.equal(f_solo[0], fired[row])
        h_solo = solo.history()[0]
        assert [s for s, _, _ in h_solo] == [s for s, _, _ in hist[row]]
        assert [x for _, x, _ in h_solo] == pytest.approx([x for _, x, _ in hist[row]], abs=1e-6)
    # feeding 7 tokens per call gives the same windows and decisions as one per call
    mon7 = AttnOutputMonitor(_drift())
    f7 = _run(mon7, trace, gen, step=7)
    assert torch.equal(f7.any(1), fired.any(1))
    assert [s for s, _, _ in mon7.history()[0]] == [s for s, _, _ in hist[0]]
    # invalid tokens (interleaved garbage) in the generation are ignored
    monp = AttnOutputMonitor(_drift())
    idx = torch.arange(200)
    inter = torch.zeros(2, 200, 16)
    vint = (idx % 2 == 0)[None].expand(2, 200)
    inter[:, ::2] = gen
    inter[:, 1::2] = torch.randn(2, 100, 16) * 10
    fp = _run(monp, trace, inter, step=3, valid_gen=vint)
    assert torch.equal(fp.any(1), fired.any(1))
    assert [s for s, _, _ in monp.history()[1]] == [s for s, _, _ in hist[1]]


def test_retrace_some_rows():
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    mon = AttnOutputMonitor(_drift())
    mon.begin_trace(2)
    mon.observe(_topic(20, a, 0.0)[None].expand(2, -1, -1))
    mon.finalize_trace()
    tau0 = mon.tau.clone()
    mon.begin_trace(2, rows=torch.tensor([True, False]))  # row 0 keeps its baseline meanwhile
    assert mon.tracing.tolist() == [True, False] and mon.armed.tolist() == [True, True]
    mon.observe(_topic(10, b, 0.0)[None].expand(2, -1, -1))  # row 1 monitors, sees drift
    assert mon.poll().tolist() == [False, True]
    mon.finalize_trace(torch.tensor([True, False]))
    torch.testing.assert_close(mon.baseline[0, 0], b)
    torch.testing.assert_close(mon.baseline[1, 0], a)
    assert float(mon.tau[1]) == float(tau0[1])
    assert mon.poll().tolist() == [False, False]  # poll cleared the flags


def test_multi_layer_attn_output_averages_similarity():
    mon = AttnOutputMonitor(_drift(window=2))
    x1, x2 = torch.randn(1, 4, 3), torch.randn(1, 4, 5)
    with pytest.raises(RuntimeError):
        mon.features([x1, x2])  # different d cannot be stacked
    y1, y2 = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    f = mon.features([y1, y2])
    assert f.shape == (1, 4, 2, 3)
    s = mon.similarity(f[:, 0], f[:, 1])
    exp = (_cos(y1[0, 0], y1[0, 1]) + _cos(y2[0, 0], y2[0, 1])) / 2
    assert float(s[0]) == pytest.approx(exp, abs=1e-6)


# ---------------------------------------------------------------- attn_probs


def _causal_probs(b, h, t, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, t, s, generator=g)
    q = torch.arange(s - t, s)[:, None]
    logits = logits.masked_fill(torch.arange(s)[None] > q, float("-inf"))
    return logits.softmax(-1)


def test_bucket_features_sum_to_one_and_hand_example():
    p = _causal_probs(2, 3, 4, 40)
    f = distance_bucket_features(p, 6)
    assert f.shape == (2, 4, 3, 6)
    torch.testing.assert_close(f.sum(-1), torch.ones(2, 4, 3))
    # one query at position 9 of S = 10: distances 9..0 for keys 0..9
    q = torch.zeros(1, 1, 1, 10)
    q[..., 9] = 0.1  # d 0 -> bucket 0
    q[..., 8] = 0.2  # d 1 -> bucket 1
    q[..., 6] = 0.3  # d 3 -> bucket 2
    q[..., 5] = 0.1  # d 4 -> bucket 3
    q[..., 0] = 0.3  # d 9 -> bucket 4 (8-15); with 4 buckets it falls in the open last one
    torch.testing.assert_close(
        distance_bucket_features(q, 6)[0, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.1, 0.3, 0.0])
    )
    torch.testing.assert_close(
        distance_bucket_features(q, 4)[0, 0, 0], torch.tensor([0.1, 0.2, 0.3, 0.4])
    )
    # explicit positions (static cache: keys beyond the position are empty)
    qs = torch.nn.functional.pad(q, (0, 5))
    torch.testing.assert_close(
        distance_bucket_features(qs, 6, positions=torch.tensor([9]))[0, 0, 0],
        distance_bucket_features(q, 6)[0, 0, 0],
    )


def test_js_similarity():
    p = torch.tensor([0.2, 0.3, 0.5, 0.0])
    assert float(js_similarity(p, p)) == pytest.approx(1.0)
    assert float(js_similarity(torch.tensor([1.0, 0]), torch.tensor([0, 1.0]))) == pytest.approx(
        0.0
    )
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    m = (p + q) / 2
    kl = lambda x, y: sum(  # noqa: E731
        float(a) * math.log2(float(a) / float(c)) for a, c in zip(x, y, strict=True) if a > 0
    )
    exp = 1 - 0.5 * (kl(p, m) + kl(q, m))
    assert float(js_similarity(p, q)) == pytest.approx(exp, abs=1e-6)


def _local_or_far(t, s0, h, local, seed):
    """Attention rows of t queries at the end of s0 + t keys: local (recent) or far (start)."""
    g = torch.Generator().manual_seed(seed)
    s = s0 + t
    p = torch.zeros(1, h, t, s)
    for i in range(t):
        q = s0 + i
        p[0, :, i, q - 2 : q + 1] = 1.0 if local else 0.05
        p[0, :, i, 0:4] = 0.05 if local else 1.0
    p = p + 0.01 * torch.rand(p.shape, generator=g) * (p > 0)
    return p / p.sum(-1, keepdim=True)


def test_attn_probs_monitor_stable_then_triggers():
    cfg = _drift(signal="attn_probs", num_buckets=8)
    mon = make_monitor(cfg)
    assert isinstance(mon, AttnProbsMonitor) and "eager" in AttnProbsMonitor.__doc__
    mon.begin_trace(1)
    mon.observe(_local_or_far(30, 20, 2, True, 0))
    mon.finalize_trace()
    fired = []
    s = 50
    for i in range(30):
        local = i < 15
        mon.observe(_local_or_far(1, s + i, 2, local, i + 1))
        fired.append(bool(mon.poll()[0]))
    assert not any(fired[:15]) and any(fired[15:25])
    hist = mon.history()[0]
    assert all(0.0 <= x <= 1.0 for _, x, _ in hist)


def test_make_monitor_and_null_and_layers():
    assert isinstance(make_monitor(DriftConfig()), AttnOutputMonitor)
    null = make_monitor(DriftConfig(enabled=False))
    assert isinstance(null, NullMonitor)
    null.begin_trace(2)
    null.observe(torch.randn(2, 5, 3))
    null.finalize_trace()
    assert null.poll().tolist() == [False, False] and null.history() == [[], []]
    assert resolve_watch_layers((-1, 0, -1), 30) == [0, 29]
    with pytest.raises(ValueError, match="layer 30"):
        resolve_watch_layers((30,), 30)
