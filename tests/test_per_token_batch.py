"""Per-token methods on a batch: ``batch_policy`` picks the fused ops' policy of a decode step
(``per_sequence`` -> ``token``: every sequence its own neurons; ``shared`` -> ``union``: one set,
the union of the sequences' choices, for all). At batch 3 the union policy's outputs equal the
reference op's (``dart_ext.per_token``, policy ``union``) and its meter counts the union, which
is more than each sequence's own choice; ``per_sequence`` keeps every sequence exactly its own.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_ids, tiny_model

import dart
from dart import DARTConfig
from dart.core.config import ConfigError
from dart.core.per_token import PER_TOKEN_MODES
from dart_ext import per_token as ref_ops
from dart_ext.reference import apply_act

MODES = tuple(PER_TOKEN_MODES)
BACKENDS = ("masked", "gathered")
POLICIES = {"per_sequence": "token", "shared": "union"}
ACT = "silu"  # the tiny llama's FFN activation


def _calibrated(model, method, backend, batch_policy):
    handle = dart.attach(
        model,
        DARTConfig(method=method, backend=backend, total_prune=0.4, batch_policy=batch_policy),
    )
    handle.calibrate(random_ids(1, 40, seed=7))
    return handle


def _decode_step_io(model, handle, ids):
    """Prefill ids (dense), then one decode token per sequence: each FFN's (x, y) of that step."""
    seen = {}
    hooks = [
        f.register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(i, (a[0], y)))
        for i, f in enumerate(handle.ffns)
    ]
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            handle.reset()  # the meters from the decode step on
            model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _reference(f, x, policy):
    p, thr = f.parts, f.pt_thresholds
    if f.per_token.knobs == ("neurons",):
        return ref_ops.gate_first_glu_ffn(
            x, p.w_gate, p.w_up, p.w_down_t, thr[0], f.pt_scale, ACT, None, policy
        )
    return ref_ops.input_sparse_glu_ffn(
        x, p.w_gate, p.w_up, p.w_down_t, thr[0], thr[1], ACT, policy
    )


def _own_and_union_reads(f, x):
    """Entries a token reads under its own choice [M], and under the union of the M tokens."""
    p, thr = f.parts, f.pt_thresholds.float()
    xs = x.float().reshape(-1, x.shape[-1])
    n, d = p.w_up.shape
    if f.per_token.knobs == ("neurons",):
        a = apply_act(ACT, xs @ p.w_gate.float().T)
        keep = a.abs() * f.pt_scale.float() >= thr[0]
        return n * d + 2 * d * keep.sum(-1).float(), float(n * d + 2 * d * keep.any(0).sum())
    kx = xs.abs() >= thr[0]
    own_x = xs * kx
    h = apply_act(ACT, own_x @ p.w_gate.float().T) * (own_x @ p.w_up.float().T)
    own = 2 * n * kx.sum(-1).float() + d * (h.abs() >= thr[1]).sum(-1).float()
    ux = xs * kx.any(0)
    hu = apply_act(ACT, ux @ p.w_gate.float().T) * (ux @ p.w_up.float().T)
    union = 2 * n * kx.any(0).sum() + d * (hu.abs() >= thr[1]).any(0).sum()
    return own, float(union)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", MODES)
@pytest.mark.parametrize("batch_policy", list(POLICIES))
def test_batch_of_three_follows_the_policy(batch_policy, method, backend):
    model = tiny_model("llama", layers=2)
    handle = _calibrated(model, method, backend, batch_policy)
    policy = POLICIES[batch_policy]
    assert all(f.per_token_policy == policy for f in handle.ffns)
    seen = _decode_step_io(model, handle, random_ids(3, 10, seed=3))
    total_read = total_dense = 0.0
    for i, f in enumerate(handle.ffns):
        x, y = seen[i]
        assert x.shape[:2] == (3, 1)
        want, _ = _reference(f, x, policy)
        # masked vs gathered sums differ in order (~1e-6); a neuron more or less moves y ~1e-1
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        own, union = _own_and_union_reads(f, x)
        assert union > float(own.max())  # the sequences chose differently: the test can tell
        expect = 3 * union if policy == "union" else float(own.sum())
        assert float(f.pt_read) == pytest.approx(expect * f.entry_bytes)
        total_read += float(f.pt_read)
        total_dense += float(f.pt_dense)
    fraction = handle.stats()["ffn_bytes_read_fraction"]
    assert fraction == pytest.approx(total_read / total_dense)
    handle.detach()


def test_union_outputs_differ_from_per_sequence_outputs():
    """The policies really differ: the union computes every sequence over more neurons."""
    ids = random_ids(3, 10, seed=3)
    outs = {}
    for batch_policy in POLICIES:
        model = tiny_model("llama", layers=2)
        handle = _calibrated(model, "gate", "gathered", batch_policy)
        outs[batch_policy] = _decode_step_io(model, handle, ids)[0][1]
        handle.detach()
    assert not torch.allclose(outs["shared"], outs["per_sequence"], rtol=1e-3, atol=1e-3)


def test_a_batch_policy_outside_the_choices_is_refused_naming_it():
    with pytest.raises(ConfigError, match="batch_policy"):
        DARTConfig(method="gate", total_prune=0.3, batch_policy="union")
