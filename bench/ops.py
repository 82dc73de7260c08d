"""Op-level benchmark: index-in-kernel gathered_glu_ffn, compact path (compact_glu_ffn on
pre-sliced buffers), one re-slice (gather_neurons_ for gate_up and down) vs the dense FFN.

Arms are timed interleaved (dense, gathered, compact, reslice, dense, ...) after a warm-up; the
table reports medians. Example:

    python bench/ops.py --quick
    python bench/ops.py --shapes smollm2-135m --tokens 1 --dtypes fp32 bf16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dart_ext
from dart_ext.reference import apply_act

SHAPES = {"smollm2-135m": (576, 1536), "llama-3.1-8b": (4096, 14336)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_once(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_arms(arms, device, budget_s, max_reps, min_reps=5):
    """Interleaved timing; returns {name: median ms}."""
    for fn in arms.values():  # warm-up
        fn()
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for fn in arms.values():
        _time_once(fn, device)
    per_round = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(min_reps, min(max_reps, budget_s / per_round)))
    samples = {name: [] for name in arms}
    for _ in range(reps):
        for name, fn in arms.items():
            samples[name].append(_time_once(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


def dense_ffn(x, wg, wu, wd, act):
    return F.linear(apply_act(act, F.linear(x, wg)) * F.linear(x, wu), wd)


def make_arms(x, wg, wu, wdt, wd, idx, gate_up, down_c):
    """The timed callables; only the dense arm when idx is None."""

    def dense():
        return dense_ffn(x, wg, wu, wd, "silu")

    if idx is None:
        return {"dense": dense}

    def gathered():
        return dart_ext.gathered_glu_ffn(x, wg, wu, wdt, idx, "silu")

    def compact():
        return dart_ext.compact_glu_ffn(x, gate_up, down_c, "silu")

    def reslice():
        dart_ext.gather_neurons_(gate_up, [wg, wu], idx)
        dart_ext.gather_neurons_(down_c, [wdt], idx)

    return {"dense": dense, "gathered": gathered, "compact": compact, "reslice": reslice}


def run(args):
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    records = []
    gen = torch.Generator().manual_seed(0)
    hdr = (
        f"{'shape':<13} {'T':>4} {'dtype':<5} {'keep':>4} {'dense':>8} {'gather':>8} "
        f"{'compact':>8} {'reslice':>8} {'g/d':>5} {'c/d':>5} {'ideal':>5} {'GB/s':>6}"
        f" {'g/d32':>6} {'c/d32':>6}"
    )
    print(f"device={device} threads={torch.get_num_threads()} (times in ms, medians)")
    print(hdr)
    print("-" * len(hdr))
    for shape in args.shapes:
        d, n = SHAPES[shape]
        base = [torch.randn(n, d, generator=gen) * d**-0.5 for _ in range(3)]
        dense_fp32 = {}
        dtypes = list(args.dtypes)
        if any(dt != "fp32" for dt in dtypes) and "fp32" not in dtypes:
            dtypes = ["fp32-baseline"] + dtypes
        for dt_name in dtypes:
            baseline_only = dt_name == "fp32-baseline"
            dtype = torch.float32 if baseline_only else DTYPES[dt_name]
            wg, wu, wdt = (w.to(device=device, dtype=dtype) for w in base)
            wd = wdt.t().contiguous()  # dense HF orientation [d, N], its own storage
            for T in args.tokens:
                x = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
                if baseline_only:
                    arms = make_arms(x, wg, wu, wdt, wd, None, None, None)
                    t = bench_arms(arms, device, args.budget, args.max_reps)
                    dense_fp32[T] = t["dense"]
                    continue
                for keep in args.keeps:
                    k = max(1, round(keep * n))
                    idx = torch.randperm(n, generator=gen)[:k].sort().values.to(device)
                    gate_up = torch.empty(2 * k, d, device=device, dtype=dtype)
                    down_c = torch.empty(k, d, device=device, dtype=dtype)
                    dart_ext.gather_neurons_(gate_up, [wg, wu], idx)
                    dart_ext.gather_neurons_(down_c, [wdt], idx)

                    arms = make_arms(x, wg, wu, wdt, wd, idx, gate_up, down_c)
                    t = bench_arms(arms, device, args.budget, args.max_reps)
                    if dt_name == "fp32":
                        dense_fp32.setdefault(T, t["dense"])
                    elem = wg.element_size()
                    nbytes = 3 * k * d * elem + 2 * T * d * elem
                    rec = {
                        "shape": shape,
                        "d": d,
                        "N": n,
                        "T": T,
                        "dtype": dt_name,
                        "keep": keep,
                        "k": k,
                        "device": str(device),
                        "threads": torch.get_num_threads(),
                        "dense_ms": t["dense"],
                        "gathered_ms": t["gathered"],
                        "compact_ms": t["compact"],
                        "reslice_ms": t["reslice"],
                        "ratio_gathered": t["gathered"] / t["dense"],
                        "ratio_compact": t["compact"] / t["dense"],
                        "ideal": k / n,
                        "gathered_GBps": nbytes / (t["gathered"] * 1e-3) / 1e9,
                    }
                    if dt_name != "fp32" and T in dense_fp32:
                        rec["dense_fp32_ms"] = dense_fp32[T]
                        rec["ratio_gathered_vs_fp32_dense"] = t["gathered"] / dense_fp32[T]
                        rec["ratio_compact_vs_fp32_dense"] = t["compact"] / dense_fp32[T]
                    records.append(rec)
                    extra = ""
                    if "dense_fp32_ms" in rec:
                        extra = (
                            f" {rec['ratio_gathered_vs_fp32_dense']:>6.3f}"
                            f" {rec['ratio_compact_vs_fp32_dense']:>6.3f}"
                        )
                    print(
                        f"{shape:<13} {T:>4} {dt_name:<5} {keep:>4.2f} {t['dense']:>8.3f} "
                        f"{t['gathered']:>8.3f} {t['compact']:>8.3f} {t['reslice']:>8.3f} "
                        f"{rec['ratio_gathered']:>5.2f} {rec['ratio_compact']:>5.2f} "
                        f"{rec['ideal']:>5.2f} {rec['gathered_GBps']:>6.1f}{extra}",
                        flush=True,
                    )
                    del gate_up, down_c, arms
            del wg, wu, wdt, wd
            gc.collect()
        del base
        gc.collect()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer reps and shapes (< 2 min)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--keeps", nargs="+", type=float, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per config")
    p.add_argument("--max-reps", type=int, default=None)
    p.add_argument("--json", default=None, help="write the records as a JSON list here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    q = args.quick
    args.shapes = args.shapes or (["smollm2-135m", "llama-3.1-8b"])
    args.tokens = args.tokens or ([1, 16] if q else [1, 16, 256])
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    args.keeps = args.keeps or ([1.0, 0.5, 0.3] if q else [1.0, 0.7, 0.5, 0.3, 0.1])
    args.budget = args.budget or (0.3 if q else 1.5)
    args.max_reps = args.max_reps or (30 if q else 200)
    records = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
