"""The registries beside the methods': rankings (`dart.core.scoring.RANKINGS`), sparse backends
(`dart.core.ffn.BACKENDS`) and drift signals (`dart.core.drift.SIGNALS`): the config accepts
exactly their names, lookups name every registered entry when refused, and each entry does
what its name says."""

from __future__ import annotations

import pytest
import torch

from dart.core import config
from dart.core.drift import SIGNALS, NullMonitor, get_signal, make_monitor
from dart.core.ffn import BACKENDS, Backend, get_backend
from dart.core.scoring import RANKINGS, get_ranking, rank_scores


def test_config_names_are_the_registries():
    assert tuple(RANKINGS) == config.RANKINGS
    assert tuple(BACKENDS) == config.BACKENDS
    assert tuple(SIGNALS) == config.DRIFT_SIGNALS
    per_token = tuple(n for n, b in BACKENDS.items() if type(b).per_token is not Backend.per_token)
    assert per_token == config.PER_TOKEN_BACKENDS
    # read from the registries, not copied: the config holds no tuple of these names
    assert not {"RANKINGS", "BACKENDS", "DRIFT_SIGNALS", "PER_TOKEN_BACKENDS"} & set(vars(config))


def test_a_registered_ranking_is_accepted_by_the_config(monkeypatch):
    from dart.core import scoring

    with pytest.raises(config.ConfigError, match="ranking: 'newest'"):
        config.DARTConfig(ranking="newest")
    extended = {**scoring.RANKINGS, "newest": scoring.RANKINGS["max"]}
    monkeypatch.setattr(scoring, "RANKINGS", extended)
    assert config.DARTConfig(ranking="newest").ranking == "newest"
    assert "newest" in config.RANKINGS


@pytest.mark.parametrize(
    ("lookup", "message"),
    [
        (get_ranking, "ranking: 'x' is not one of magnitude, max, mean, combined, product"),
        (get_backend, "backend 'x' is not one of masked, gathered, compact"),
        (get_signal, "DriftConfig.signal: 'x' is not one of attn_output, attn_probs, attn_content"),
    ],
)
def test_unknown_names_are_refused_with_the_registered_ones(lookup, message):
    with pytest.raises(ValueError, match=message):
        lookup("x")
    with pytest.raises(ValueError, match="is not one of"):
        lookup(["not", "hashable"])


def test_rankings_score_as_the_spec_table():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 7, generator=g, dtype=torch.float64)  # cast to fp32 by the ranking
    pmax, pmean = torch.rand(7, generator=g), torch.rand(7, generator=g)
    mf = m.float()
    expected = {
        "magnitude": mf,
        "max": pmax * mf,
        "mean": pmean * mf,
        "combined": (pmax + pmean) * mf,
        "product": pmax * pmean * mf.square(),
    }
    assert set(expected) == set(RANKINGS)
    for name, want in expected.items():
        got = rank_scores(name, m, pmax, pmean)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert torch.equal(rank_scores("magnitude", m), mf)  # no proxies needed
    for name, ranking in RANKINGS.items():
        for missing in ranking.needs:
            given = {"pmax": pmax, "pmean": pmean, missing: None}
            with pytest.raises(ValueError, match=f"ranking {name!r} needs {missing}"):
                rank_scores(name, m, given["pmax"], given["pmean"])
        if ranking.needs:
            with pytest.raises(ValueError, match=r"shape \(6,\) is not \[N\] = \[7\]"):
                rank_scores(name, m, pmax[:6], pmean[:6])


def test_backends_state_what_they_run():
    assert [b.name for b in BACKENDS.values() if not b.kernels] == ["masked"]
    assert [b.name for b in BACKENDS.values() if b.keeps_copies] == ["compact"]
    with pytest.raises(ValueError, match="backend 'compact' cannot run per-token methods"):
        get_backend("compact").per_token(None, None, None, torch.zeros(1))


def test_signals_make_their_monitors_and_capture_their_inputs():
    for name, signal in SIGNALS.items():
        cfg = config.DriftConfig(signal=name)
        assert type(make_monitor(cfg)) is signal.monitor
    assert type(make_monitor(config.DriftConfig(enabled=False))) is NullMonitor
    out, probs, hidden = torch.zeros(1, 2, 4), torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 4)
    assert SIGNALS["attn_output"].capture((out, None), (hidden,), {}) is out
    assert SIGNALS["attn_probs"].capture((out, probs), (hidden,), {}) is probs
    assert SIGNALS["attn_probs"].capture((out, None), (hidden,), {}) is None
    got = SIGNALS["attn_content"].capture((out, probs), (), {"hidden_states": hidden})
    assert got[0] is probs and got[1] is hidden
    assert SIGNALS["attn_content"].capture((out, None), (hidden,), {}) is None
    assert [s.name for s in SIGNALS.values() if s.needs_weights] == ["attn_probs", "attn_content"]
