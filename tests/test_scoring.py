import math

import pytest
import torch

from dart.core.scoring import (
    ActivationAccumulator,
    ProxyCache,
    SensitivityAccumulator,
    output_proxy,
    rank_scores,
    select_threshold,
    select_topk,
    shared_scores,
    weight_fingerprint,
)


def _left_pad_mask(lengths, t):
    return torch.stack([torch.arange(t) >= t - n for n in lengths])


# ---------------------------------------------------------------- accumulators


def test_l2_vs_naive_left_padding_and_fp16():
    torch.manual_seed(0)
    b, t, n = 3, 6, 5
    h = (torch.randn(b, t, n) * 300).half()  # squares overflow fp16
    valid = _left_pad_mask([6, 3, 1], t)
    acc = ActivationAccumulator([n, 7], ema_decay=None)
    acc.reset(b, "cpu")
    acc.update(0, h[:, :4], valid[:, :4])
    acc.update(0, h[:, 4:], valid[:, 4:])
    for i in range(b):
        rows = [h[i, j].float() for j in range(t) if valid[i, j]]
        ref = torch.stack(rows).square().sum(0).sqrt()
        torch.testing.assert_close(acc.magnitudes(0)[i], ref)
    assert torch.isfinite(acc.magnitudes(0)).all()
    assert acc.magnitudes(1).shape == (b, 7) and not acc.magnitudes(1).any()


def _ema_naive(tokens_per_call, d):
    """tokens_per_call: list of lists of activation vectors (valid tokens only)."""
    m = None
    for toks in tokens_per_call:
        if not toks:
            continue
        if m is None:
            tt = len(toks)
            w = torch.tensor([d ** (tt - 1 - i) for i in range(tt)], dtype=torch.float64)
            w = w / w.sum()
            m = sum(wi * a.abs().double() for wi, a in zip(w, toks, strict=True))
        else:
            for a in toks:
                m = d * m + (1 - d) * a.abs().double()
    return m


def test_ema_vs_naive_prefill_decode_continuation_arbitrary_mask():
    torch.manual_seed(1)
    d, n, b = 0.8, 4, 3
    acc = ActivationAccumulator([n], ema_decay=d)
    acc.reset(b, "cpu")
    calls = []
    # prefill with left padding (row 2 has an arbitrary hole), then chunk 2, then 3 decode steps
    v0 = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    v1 = torch.tensor([[1, 1], [1, 1], [0, 1]], dtype=torch.bool)
    masks = [v0, v1] + [torch.ones(b, 1, dtype=torch.bool)] * 3
    masks[3] = torch.tensor([[1], [0], [1]], dtype=torch.bool)
    for v in masks:
        h = torch.randn(b, v.shape[1], n)
        acc.update(0, h, v)
        calls.append((h, v))
    for i in range(b):
        per_call = [[h[i, j] for j in range(v.shape[1]) if v[i, j]] for h, v in calls]
        ref = _ema_naive(per_call, d).float()
        torch.testing.assert_close(acc.magnitudes(0)[i], ref, rtol=1e-5, atol=1e-6)


def test_ema_single_token_rules():
    acc = ActivationAccumulator([2], ema_decay=0.5)
    acc.reset(1)
    acc.update(0, torch.tensor([[[2.0, -4.0]]]), None)
    torch.testing.assert_close(acc.magnitudes(0), torch.tensor([[2.0, 4.0]]))
    acc.update(0, torch.tensor([[[0.0, 8.0]]]), None)
    torch.testing.assert_close(acc.magnitudes(0), torch.tensor([[1.0, 6.0]]))


def test_reset_rows():
    acc = ActivationAccumulator([3, 2])
    acc.reset(2)
    acc.update(0, torch.ones(2, 2, 3), None)
    acc.update(1, torch.ones(2, 2, 2), None)
    acc.reset_rows(torch.tensor([True, False]))
    assert acc.magnitudes(0)[0].abs().sum() == 0
    torch.testing.assert_close(acc.magnitudes(1)[1], torch.full((2,), math.sqrt(2)))
    # EMA: a reset row starts afresh (its next update is normalised), the other continues
    ema = ActivationAccumulator([1], ema_decay=0.5)
    ema.reset(2)
    ema.update(0, torch.full((2, 1, 1), 4.0), None)
    ema.reset_rows(torch.tensor([True, False]))
    ema.update(0, torch.full((2, 1, 1), 2.0), None)
    torch.testing.assert_close(ema.magnitudes(0), torch.tensor([[2.0], [3.0]]))


def test_update_shape_error():
    acc = ActivationAccumulator([3])
    acc.reset(2)
    with pytest.raises(ValueError, match="h: shape"):
        acc.update(0, torch.ones(2, 1, 4), None)


# ---------------------------------------------------------------- output proxy


def test_output_proxy_vs_naive_and_chunking():
    torch.manual_seed(2)
    w = torch.randn(6, 8)
    e = torch.randn(37, 8).half()
    full = (w @ e.float().T).abs()
    for cs in (1, 5, 37, 4096):
        pmax, pmean = output_proxy(w, e, chunk_size=cs)
        torch.testing.assert_close(pmax, full.amax(1))
        torch.testing.assert_close(pmean, full.mean(1))
    with pytest.raises(ValueError, match="same d"):
        output_proxy(w, torch.randn(3, 7))


def test_proxy_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DART_CACHE", str(tmp_path))
    cache = ProxyCache()
    assert cache.root == tmp_path / "proxy"
    w = torch.randn(4, 3)
    parts = ("model", 0, "embedding", weight_fingerprint(w))
    calls = []

    def fn():
        calls.append(1)
        return (torch.ones(4), torch.zeros(4))

    a = cache.get_or_compute(parts, fn)
    b = cache.get_or_compute(parts, fn)
    assert len(calls) == 1
    torch.testing.assert_close(a, b)
    assert [p.suffix for p in cache.root.iterdir()] == [".pt"]  # no temp files left
    w2 = w.clone()
    w2[0, 0] += 1
    assert weight_fingerprint(w2) != weight_fingerprint(w)
    cache.get_or_compute(("model", 1, "embedding", weight_fingerprint(w)), fn)
    assert len(calls) == 2
    cache.path(parts).write_bytes(b"garbage")  # corrupt entry is recomputed
    cache.get_or_compute(parts, fn)
    assert len(calls) == 3


def test_proxy_cache_default_root(monkeypatch):
    monkeypatch.delenv("DART_CACHE", raising=False)
    assert str(ProxyCache().root).endswith(".cache/dart/proxy")


# ---------------------------------------------------------------- ranking / selection


def test_rank_scores_formulas():
    m = torch.tensor([[1.0, 2.0, 3.0]])
    pmax = torch.tensor([2.0, 1.0, 0.5])
    pmean = torch.tensor([1.0, 3.0, 2.0])
    torch.testing.assert_close(rank_scores("magnitude", m, None, None), m)
    torch.testing.assert_close(rank_scores("max", m, pmax, pmean), torch.tensor([[2.0, 2, 1.5]]))
    torch.testing.assert_close(rank_scores("mean", m, pmax, pmean), torch.tensor([[1.0, 6, 6]]))
    torch.testing.assert_close(
        rank_scores("combined", m, pmax, pmean), torch.tensor([[3.0, 8, 7.5]])
    )
    torch.testing.assert_close(rank_scores("product", m, pmax, pmean), torch.tensor([[2.0, 12, 9]]))
    with pytest.raises(ValueError, match="needs pmax"):
        rank_scores("max", m, None, pmean)
    with pytest.raises(ValueError, match="is not one of"):
        rank_scores("foo", m, pmax, pmean)


def test_select_topk_sorted_ties_nan():
    s = torch.tensor(
        [
            [0.1, 5.0, 3.0, 5.0, 2.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
            [float("nan"), 0.0, -1.0, float("nan"), -2.0],
        ]
    )
    idx = select_topk(s, 3)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [[1, 2, 3], [0, 1, 2], [1, 2, 4]]
    assert select_topk(s, 5).tolist() == [list(range(5))] * 3
    with pytest.raises(ValueError, match="k: 0"):
        select_topk(s, 0)
    with pytest.raises(ValueError, match="k: 6"):
        select_topk(s, 6)
    assert select_topk(s, 2, topk_fn=lambda x, k: torch.zeros(3, k, dtype=torch.long)).sum() == 0


def test_select_threshold_superset():
    s = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 4.0, 1.0, 3.0]])
    # row means: 4.0 and 3.0 -> qualifying counts 1 and 3
    idx, counts = select_threshold(s)
    assert counts.tolist() == [1, 3]
    assert idx.shape == (2, 3)
    assert idx[1].tolist() == [0, 1, 3]
    assert 3 in idx[0].tolist() and idx[0].tolist() == [1, 2, 3]  # superset: top-3 of row 0


def test_shared_scores():
    m = torch.tensor([[3.0, 0.0], [4.0, 1.0], [100.0, 100.0]])
    rows = torch.tensor([True, True, False])
    torch.testing.assert_close(shared_scores(m, rows), torch.tensor([[5.0, 1.0]]))
    torch.testing.assert_close(shared_scores(m, rows, ema=True), torch.tensor([[3.5, 0.5]]))
    assert shared_scores(m).shape == (1, 2)
    assert shared_scores(m, torch.zeros(3, dtype=torch.bool), ema=True).abs().sum() == 0


# ---------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("mode", ["residual", "raw"])
def test_sensitivity_vs_naive(mode):
    torch.manual_seed(4)
    b, t, d = 2, 5, 6
    r = torch.randn(b, t, d)
    r[0, 1] = 0.0  # ||r|| = 0: skipped
    f = torch.randn(b, t, d) * 0.3
    valid = _left_pad_mask([5, 3], t)
    acc = SensitivityAccumulator(2, mode=mode)
    acc.reset(b)
    acc.update(1, r, f, valid)
    per_seq = []
    cs, gs = [], []
    for i in range(b):
        ci, gi = [], []
        for j in range(t):
            if not valid[i, j] or r[i, j].norm() == 0:
                continue
            u = r[i, j] + f[i, j] if mode == "residual" else f[i, j]
            ci.append(torch.nn.functional.cosine_similarity(r[i, j], u, dim=0))
            gi.append(f[i, j].norm() / r[i, j].norm())
        per_seq.append((1 - torch.stack(ci).mean()) * torch.stack(gi).mean())
        cs += ci
        gs += gi
    total = (1 - torch.stack(cs).mean()) * torch.stack(gs).mean()
    s = acc.scores()
    assert s[0] == 0.0  # no statistics for layer 0
    torch.testing.assert_close(s[1], total)
    for row in range(b):
        rows = torch.arange(b) == row
        torch.testing.assert_close(acc.scores(rows)[1], per_seq[row])
    torch.testing.assert_close(acc.scores(torch.tensor([False, True]))[1], per_seq[1])
    acc.reset_rows(torch.tensor([True, False]))
    torch.testing.assert_close(acc.scores()[1], per_seq[1])
