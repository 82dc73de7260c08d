"""Op-level benchmark of the fused CPU per-token FFN ops against the dense op, side by
side in one process: us per call and the share of the FFN's weight bytes each arm read.

Arms (each cycles over --layers copies of its weights, more than the last-level cache holds, as a
decode step's layers do, so rows come from memory):

    dense        gathered_glu_ffn over all N neurons (the project's dense decode kernel; 3 N d)
    dart         gathered_glu_ffn over a fixed set of k neurons reading the same share of bytes
                 as the per-token arms' target (DART's kernel at equal bytes)
    gate         gate_first_glu_ffn: the whole gate, then up / down of the kept neurons
    input        input_sparse_glu_ffn over input-major gate / up (the attach-time copy)
    input_rows   the same over neuron-major gate / up (no copy; a gather inside each row)
    gate_<fmt>   gate_first_glu_ffn_q over q8 / q4 rows, beside `dense_<fmt>` =
                 gathered_glu_ffn_q over all N (with --quant)

Each token picks by thresholds set on random inputs to reach the target share (--reads); the
table prints the share the op really read (its `read` output / 3 N d). With T > 1 tokens
(--tokens) each per-token arm runs both batch policies: `token` (every token its own choice) and
`union` (one choice for the call).

    python bench/ops_per_token.py --quick
    python bench/ops_per_token.py --dtypes bf16 --tokens 1 4 --reads 0.7 0.5 --threads 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

import dart_ext
from dart_ext import quant
from dart_ext.per_token import fused_gate_first_glu_ffn_q, input_major
from dart_ext.reference import apply_act

SHAPES = {
    "smollm2-135m": (576, 1536),
    "qwen2.5-1.5b": (1536, 8960),
    "llama-3.1-8b": (4096, 14336),
    "tiny": (64, 256),  # smoke tests
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QFORMATS = ("q8", "q4")


def time_arms(arms: dict, budget_s: float, max_reps: int, min_reps: int = 5) -> dict:
    """Interleaved timing (one call of each arm per round) after a warm-up; medians in us."""
    for fn in arms.values():
        fn()
        fn()
    t0 = time.perf_counter()
    for fn in arms.values():
        fn()
    per_round = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(min_reps, min(max_reps, budget_s / per_round)))
    samples: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def cycled(fn, copies):
    """A callable that runs fn on the next weight copy each call (round robin); returns fn's
    last result through .last (the read meters)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        call.last = fn(copies[state["i"]])
        return call.last

    call.last = None
    return call


def quantile_threshold(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """The magnitude threshold keeping the share ``keep`` of ``scores``."""
    if keep >= 1.0:
        return torch.tensor(0.0)
    flat = scores.float().flatten()
    n = max(int(round(keep * flat.numel())), 1)
    return torch.kthvalue(flat, flat.numel() - n + 1).values.float()


def thresholds(layer: dict, x: torch.Tensor, read: float) -> dict:
    """Thresholds reaching the share ``read`` of the bytes on calibration inputs ``x`` [T, d]:
    gate (reads 1/3 + 2/3 k_n), input (2/3 k_x + 1/3 k_h, knobs tied: k = read)."""
    wg, wu = layer["fp32"][0], layer["fp32"][1]
    xf = x.float()
    a = apply_act("silu", xf @ wg.T)
    k_n = min(max((read - 1 / 3) / (2 / 3), 0.0), 1.0)
    t_gate = quantile_threshold(a.abs(), k_n)
    tx = quantile_threshold(xf.abs(), read)
    xk = xf * (xf.abs() >= tx)
    h = apply_act("silu", xk @ wg.T) * (xk @ wu.T)
    return {"gate": t_gate, "x": tx, "h": quantile_threshold(h.abs(), read)}


def make_layers(n, d, dtypes, count, gen, with_quant):
    layers = []
    for _ in range(count):
        ws = [torch.randn(n, d, generator=gen) * d**-0.5 for _ in range(3)]
        layer = {"fp32": ws}
        for name in dtypes:
            w = [t.to(DTYPES[name]) for t in ws]
            layer[name] = w
            layer[name + "_t"] = [input_major(w[0]), input_major(w[1])]
        if with_quant:
            for f in QFORMATS:
                layer[f] = [quant.quantize_rows(t, f, 32) for t in ws]
        layers.append(layer)
    return layers


def arms_for(layers, x, dt, read, policy, thr, quant_fmt=None):
    """The timed callables of one configuration."""
    n, d = layers[0]["fp32"][0].shape
    xd = x.to(DTYPES[dt])
    ones = torch.ones(n)
    k = max(1, round(read * n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:k].sort().values
    all_idx = torch.arange(n)
    arms = {
        "dense": cycled(lambda c: dart_ext.gathered_glu_ffn(xd, *c[dt], all_idx, "silu"), layers),
        "dart": cycled(lambda c: dart_ext.gathered_glu_ffn(xd, *c[dt], idx, "silu"), layers),
        "gate": cycled(
            lambda c: torch.ops.dart.gate_first_glu_ffn(
                xd, *c[dt], thr["gate"], ones, "silu", None, policy
            ),
            layers,
        ),
        "input": cycled(
            lambda c: torch.ops.dart.input_sparse_glu_ffn(
                xd, *c[dt + "_t"], c[dt][2], thr["x"], thr["h"], "silu", policy
            ),
            layers,
        ),
        "input_rows": cycled(
            lambda c: torch.ops.dart.input_sparse_glu_ffn(
                xd, *c[dt], thr["x"], thr["h"], "silu", policy
            ),
            layers,
        ),
    }
    if quant_fmt:
        q = quant_fmt
        arms["dense_" + q] = cycled(
            lambda c: dart_ext.ops.gathered_glu_ffn_q(x, *c[q], all_idx, "silu"), layers
        )
        arms["gate_" + q] = cycled(
            lambda c: fused_gate_first_glu_ffn_q(x, *c[q], thr["gate"], ones, "silu", None, policy),
            layers,
        )
    return arms, k


def run(args) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cap = torch.ops.dart.cpu_capability()
    load = os.getloadavg()[0]
    print(
        f"cpu capability={cap} threads={torch.get_num_threads()} layers={args.layers} "
        f"load={load:.2f} (us per call, medians; rd = share of the FFN's weight bytes read)"
    )
    records = []
    for shape in args.shapes:
        d, n = SHAPES[shape]
        layers = make_layers(n, d, args.dtypes, args.layers, gen, bool(args.quant))
        for T in args.tokens:
            x = torch.randn(T, d, generator=gen)
            calib = torch.randn(64, d, generator=gen)
            for read in args.reads:
                thr = thresholds(layers[0], calib, read)
                policies = ["token", "union"] if T > 1 else ["token"]
                for dt in args.dtypes:
                    for policy in policies:
                        qf = args.quant if dt == args.dtypes[0] else None
                        arms, k = arms_for(layers, x, dt, read, policy, thr, qf)
                        t = time_arms(arms, args.budget, args.max_reps)
                        rd = {}
                        for name, fn in arms.items():
                            out = fn.last
                            rd[name] = (
                                float(out[1].float().mean()) / (3 * n * d)
                                if isinstance(out, tuple)
                                else (k / n if name == "dart" else 1.0)
                            )
                        rec = {
                            "shape": shape,
                            "d": d,
                            "N": n,
                            "T": T,
                            "dtype": dt,
                            "policy": policy,
                            "target_read": read,
                            "capability": cap,
                            "threads": torch.get_num_threads(),
                            "layers": args.layers,
                            "load": load,
                            **{f"{a}_us": v for a, v in t.items()},
                            **{f"{a}_read": v for a, v in rd.items()},
                            **{f"ratio_{a}": t[a] / t["dense"] for a in t if a != "dense"},
                        }
                        records.append(rec)
                        cells = "  ".join(
                            f"{a} {t[a]:8.1f} ({t[a] / t['dense']:4.2f}x rd {rd[a]:.2f})" for a in t
                        )
                        print(f"{shape} T={T} {dt} {policy:<5} target {read:.2f}: {cells}")
        del layers
        gc.collect()
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one shape, short timing (< 2 min)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--reads", nargs="+", type=float, default=None, help="target byte shares")
    p.add_argument("--quant", choices=QFORMATS, default=None, help="also the quantised arms")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--layers", type=int, default=4, help="weight copies the calls cycle over")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per config")
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--json", default=None, help="write the records as a JSON list here")
    args = p.parse_args(argv)
    for r in args.reads or ():
        if not 0.0 < r <= 1.0:
            p.error(f"--reads: {r} is not in (0, 1]")
    q = args.quick
    args.shapes = args.shapes or ["qwen2.5-1.5b"]
    args.tokens = args.tokens or ([1] if q else [1, 4])
    args.dtypes = args.dtypes or ["bf16"]
    args.reads = args.reads or ([0.5] if q else [0.7, 0.5, 0.3])
    args.budget = args.budget or (0.5 if q else 2.0)
    args.max_reps = args.max_reps or (20 if q else 100)
    records = run(args)
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
