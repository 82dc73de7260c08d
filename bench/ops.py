"""Op-level benchmark: index-in-kernel gathered_glu_ffn, compact path (compact_glu_ffn on
pre-sliced buffers), one re-slice (gather_neurons_ for gate_up and down) vs the dense FFN. On CPU
also `padded`: gathered_glu_ffn on the same k neurons given as a per-row budget (a padded idx
[1, kmax] with kmax = min(N, 2k) and lengths [k]), whose ratio to `gathered` (`p/g`) is the cost of
the padding (ideally 1: entries past the length are never read).

Arms are timed interleaved (dense, gathered, compact, reslice, dense, ...) after a warm-up; the
table reports medians. Example:

    python bench/ops.py --quick
    python bench/ops.py --shapes smollm2-135m --tokens 1 --dtypes fp32 bf16 --json out.json

On CUDA (--device cuda) every arm is captured as one CUDA graph of --calls back-to-back calls
(eager back-to-back calls if capture fails; the record says which), cycling over --layers
copies of the weights so that no call finds its rows in L2 from the call before; times are per
call, in microseconds. A device-to-device copy of the gathered arm's weight bytes (3 k d) is
the 100% line: `g%cp` is the gathered arm's bandwidth (weight bytes read per second) over the
copy's (bytes read + written per second), `d%cp` and `c%cp` the same for the dense arm (3 N d
bytes) and the compact arm (3 k d). Whether the gathered op ran its decode kernels or the
gather + cuBLAS route depends on DART_CUDA_GEMM_MIN_TOKENS (default 8): run once as is and once
with it set to 17 to measure both sides of the crossover.

    python bench/ops.py --device cuda --shapes llama-3.1-8b --tokens 1 4 8 16 --dtypes bf16

--quant: the gathered GLU FFN over bf16 rows against the q8 / q4 / q4m formats (dart_ext.quant):
on CPU beside a streaming read, on CUDA beside a device copy of the q4 arm's bytes, e.g.

    python bench/ops.py --quant --device cuda --tokens 1 --keeps 1.0 0.5 0.3
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
import torch.nn.functional as F

import dart_ext
from dart_ext.reference import apply_act

SHAPES = {
    "smollm2-135m": (576, 1536),
    "qwen2.5-1.5b": (1536, 8960),
    "llama-3.1-8b": (4096, 14336),
}
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


def _cuda_graph(fns, calls):
    """One CUDA graph of `calls` back-to-back calls cycling over `fns` (None: not capturable)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (workspace, cuBLAS handles)
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
    except RuntimeError as e:
        print(f"  (CUDA graph capture failed, timing eager calls: {e})", file=sys.stderr)
        return None
    return graph


def bench_arms_cuda(arm_sets, budget_s, max_reps, calls, min_reps=5):
    """arm_sets: one {name: fn} per weight copy. Interleaved replays of one graph per arm;
    returns ({name: median us per call}, {name: "graph" or "eager"})."""
    names = list(arm_sets[0])
    runners, modes = {}, {}
    for name in names:
        fns = [arms[name] for arms in arm_sets]
        graph = _cuda_graph(fns, calls)
        if graph is not None:
            runners[name], modes[name] = graph.replay, "graph"
        else:

            def eager(fns=fns):
                for i in range(calls):
                    fns[i % len(fns)]()

            runners[name], modes[name] = eager, "eager"
    for run_all in runners.values():  # warm-up
        run_all()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for run_all in runners.values():
        _time_once(run_all, torch.device("cuda"))
    per_round = max(time.perf_counter() - t0, 1e-6)
    reps = int(max(min_reps, min(max_reps, budget_s / per_round)))
    samples = {name: [] for name in names}
    for _ in range(reps):
        for name, run_all in runners.items():
            samples[name].append(_time_once(run_all, torch.device("cuda")) * 1e3 / calls)
    return {name: statistics.median(v) for name, v in samples.items()}, modes


def dense_ffn(x, wg, wu, wd, act):
    return F.linear(apply_act(act, F.linear(x, wg)) * F.linear(x, wu), wd)


def padded_indices(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [k] as one row of a per-row budget: [1, min(n, 2k)] padded with garbage, lengths [1]."""
    k = idx.shape[0]
    padded = torch.full((1, min(n, 2 * k)), n, dtype=idx.dtype, device=idx.device)
    padded[0, :k] = idx
    return padded, torch.tensor([k], device=idx.device)


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

    arms = {"dense": dense, "gathered": gathered, "compact": compact, "reslice": reslice}
    if x.device.type == "cpu":
        padded, lengths = padded_indices(idx, wg.shape[0])
        x1 = x[None]

        def gathered_padded():
            return dart_ext.gathered_glu_ffn(x1, wg, wu, wdt, padded, "silu", lengths)

        arms["padded"] = gathered_padded
    return arms


def run(args):
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    records = []
    gen = torch.Generator().manual_seed(0)
    hdr = (
        f"{'shape':<13} {'T':>4} {'dtype':<5} {'keep':>4} {'dense':>8} {'gather':>8} "
        f"{'compact':>8} {'reslice':>8} {'g/d':>5} {'c/d':>5} {'ideal':>5} {'GB/s':>6}"
        f" {'p/g':>5} {'g/d32':>6} {'c/d32':>6}"
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
                        "padded_ms": t["padded"],
                        "ratio_padded_vs_gathered": t["padded"] / t["gathered"],
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
                        f"{rec['ideal']:>5.2f} {rec['gathered_GBps']:>6.1f} "
                        f"{rec['ratio_padded_vs_gathered']:>5.2f}{extra}",
                        flush=True,
                    )
                    del gate_up, down_c, arms
            del wg, wu, wdt, wd
            gc.collect()
        del base
        gc.collect()
    return records


QUANT_FORMATS = ("q8", "q4", "q4m")


def quant_arms(x, layers, idx, streams):
    """The timed callables of run_quant; each call takes the next layer copy (round robin)."""
    xb = x.bfloat16()

    def cycled(fn, copies):
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % len(copies)
            return fn(copies[state["i"]])

        return call

    arms = {
        "bf16": cycled(
            lambda w: dart_ext.gathered_glu_ffn(xb, *w, idx, "silu"), [c["bf16"] for c in layers]
        )
    }
    for f in QUANT_FORMATS:
        arms[f] = cycled(
            lambda w: dart_ext.ops.gathered_glu_ffn_q(x, *w, idx), [c[f] for c in layers]
        )
    arms["stream"] = cycled(torch.sum, streams)
    return arms


def run_quant(args):
    """CPU: the gathered GLU FFN over bf16 rows and over each quantised format, side by side with
    a plain streaming read (torch.sum over fp32) of as many bytes as the q4 arm reads. Each arm
    cycles over --layers copies of its weights (more than the last-level cache holds, as a
    decode step's 28 layers do), so the rows come from memory, not from the cache."""
    from dart_ext import quant

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cap = torch.ops.dart.cpu_capability()
    print(
        f"cpu capability={cap} threads={torch.get_num_threads()} layers={args.layers} "
        f"group={args.group} (times in ms, medians; GB/s = kept-row bytes read per second)"
    )
    cols = ["bf16", *QUANT_FORMATS, "stream"]
    hdr = (
        f"{'shape':<13} {'T':>3} {'keep':>4} "
        + " ".join(f"{c:>7}" for c in cols)
        + " "
        + " ".join(f"{c + '/bf':>7}" for c in QUANT_FORMATS)
        + " "
        + " ".join(f"{c + ' GB/s':>9}" for c in ("bf16", *QUANT_FORMATS, "stream"))
        + f" {'q4/str':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    records = []
    for shape in args.shapes:
        d, n = SHAPES[shape]
        layers = []
        for _ in range(args.layers):
            ws = [torch.randn(n, d, generator=gen) * d**-0.5 for _ in range(3)]
            layer = {"bf16": [w.bfloat16() for w in ws]}
            for f in QUANT_FORMATS:
                layer[f] = [quant.quantize_rows(w, f, args.group) for w in ws]
            layers.append(layer)
            del ws
        for T in args.tokens:
            x = torch.randn(T, d, generator=gen)
            for keep in args.keeps:
                k = max(1, round(keep * n))
                idx = torch.randperm(n, generator=gen)[:k].sort().values
                row_bytes = {"bf16": 2 * d}
                for f in QUANT_FORMATS:
                    fm = quant.FORMATS[f]
                    row_bytes[f] = fm.row_bytes(d) + (d // args.group) * (4 if fm.has_min else 2)
                nbytes = {f: 3 * k * b for f, b in row_bytes.items()}
                nbytes["stream"] = nbytes["q4"]
                streams = [torch.ones(nbytes["stream"] // 4) for _ in range(args.layers)]
                arms = quant_arms(x, layers, idx, streams)
                t = bench_arms(arms, torch.device("cpu"), args.budget, args.max_reps)
                gbps = {c: nbytes[c] / (t[c] * 1e-3) / 1e9 for c in cols}
                rec = {
                    "shape": shape,
                    "d": d,
                    "N": n,
                    "T": T,
                    "keep": keep,
                    "k": k,
                    "group": args.group,
                    "capability": cap,
                    "threads": torch.get_num_threads(),
                    "layers": args.layers,
                }
                rec.update({f"{c}_ms": t[c] for c in cols})
                rec.update({f"{c}_GBps": gbps[c] for c in cols})
                rec.update({f"ratio_{f}_vs_bf16": t[f] / t["bf16"] for f in QUANT_FORMATS})
                rec["q4_fraction_of_stream"] = gbps["q4"] / gbps["stream"]
                records.append(rec)
                print(
                    f"{shape:<13} {T:>3} {keep:>4.2f} "
                    + " ".join(f"{t[c]:>7.3f}" for c in cols)
                    + " "
                    + " ".join(f"{t[f] / t['bf16']:>7.2f}" for f in QUANT_FORMATS)
                    + " "
                    + " ".join(f"{gbps[c]:>9.1f}" for c in ("bf16", *QUANT_FORMATS, "stream"))
                    + f" {rec['q4_fraction_of_stream']:>6.2f}",
                    flush=True,
                )
                del streams
        del layers
        gc.collect()
    return records


def gathered_route(tokens: int) -> str:
    """Which CUDA path dart::gathered_glu_ffn takes for `tokens` per index set (the rule of
    csrc/cuda/gathered_ffn_impl.h: gemm_min_tokens)."""
    min_tokens = min(max(1, int(os.environ.get("DART_CUDA_GEMM_MIN_TOKENS", "8"))), 17)
    return "decode" if tokens < min_tokens else "gemm"


def cuda_layers(n, d, dtype, count, device, gen):
    """`count` independent weight sets (wg, wu, wdt, wd) made on the device."""
    layers = []
    for _ in range(count):
        wg, wu, wdt = (
            (torch.randn(n, d, device=device, generator=gen) * d**-0.5).to(dtype) for _ in range(3)
        )
        layers.append((wg, wu, wdt, wdt.t().contiguous()))
    return layers


def cuda_arm_sets(layers, x, k, device, gen):
    """Per weight set the timed callables, plus `copy`: a device-to-device copy of the bytes the
    gathered arm reads (its 3 k d weight elements)."""
    arm_sets = []
    for wg, wu, wdt, wd in layers:
        n, d = wg.shape
        idx = torch.randperm(n, device=device, generator=gen)[:k].sort().values
        gate_up = torch.empty(2 * k, d, device=device, dtype=wg.dtype)
        down_c = torch.empty(k, d, device=device, dtype=wg.dtype)
        dart_ext.gather_neurons_(gate_up, [wg, wu], idx)
        dart_ext.gather_neurons_(down_c, [wdt], idx)
        arms = make_arms(x, wg, wu, wdt, wd, idx, gate_up, down_c)
        src = torch.ones(3 * k * d * wg.element_size(), device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        arms["copy"] = lambda dst=dst, src=src: dst.copy_(src)
        arm_sets.append(arms)
    return arm_sets


def run_cuda(args):
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    print(
        f"device={torch.cuda.get_device_name(device)} layers={args.layers} calls={args.calls} "
        f"DART_CUDA_GEMM_MIN_TOKENS={os.environ.get('DART_CUDA_GEMM_MIN_TOKENS', '8 (default)')}"
        " (us per call, medians; %cp: fraction of copy bandwidth)"
    )
    hdr = (
        f"{'shape':<13} {'T':>3} {'dtype':<5} {'keep':>4} {'route':<6} {'dense':>8} "
        f"{'gather':>8} {'compact':>8} {'reslice':>8} {'copy':>8} {'g/d':>5} {'ideal':>5} "
        f"{'GB/s':>6} {'g%cp':>5} {'c%cp':>5} {'d%cp':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    for shape in args.shapes:
        d, n = SHAPES[shape]
        for dt_name in args.dtypes:
            dtype = DTYPES[dt_name]
            elem = torch.empty((), dtype=dtype).element_size()
            layers = cuda_layers(n, d, dtype, args.layers, device, gen)
            for T in args.tokens:
                x = torch.randn(T, d, device=device, generator=gen).to(dtype)
                for keep in args.keeps:
                    k = max(1, round(keep * n))
                    arm_sets = cuda_arm_sets(layers, x, k, device, gen)
                    t, modes = bench_arms_cuda(arm_sets, args.budget, args.max_reps, args.calls)
                    kept_bytes = 3 * k * d * elem
                    copy_bw = 2 * kept_bytes / (t["copy"] * 1e-6)  # read + written
                    rec = {
                        "shape": shape,
                        "d": d,
                        "N": n,
                        "T": T,
                        "dtype": dt_name,
                        "keep": keep,
                        "k": k,
                        "device": torch.cuda.get_device_name(device),
                        "route": gathered_route(T),
                        "layers": args.layers,
                        "calls": args.calls,
                        "timing": modes,
                        **{f"{name}_us": v for name, v in t.items()},
                        "ratio_gathered": t["gathered"] / t["dense"],
                        "ratio_compact": t["compact"] / t["dense"],
                        "ideal": k / n,
                        "gathered_GBps": kept_bytes / (t["gathered"] * 1e-6) / 1e9,
                        "copy_GBps": copy_bw / 1e9,
                        "frac_copy_gathered": kept_bytes / (t["gathered"] * 1e-6) / copy_bw,
                        "frac_copy_compact": kept_bytes / (t["compact"] * 1e-6) / copy_bw,
                        "frac_copy_dense": 3 * n * d * elem / (t["dense"] * 1e-6) / copy_bw,
                    }
                    records.append(rec)
                    print(
                        f"{shape:<13} {T:>3} {dt_name:<5} {keep:>4.2f} {rec['route']:<6} "
                        f"{t['dense']:>8.1f} {t['gathered']:>8.1f} {t['compact']:>8.1f} "
                        f"{t['reslice']:>8.1f} {t['copy']:>8.1f} {rec['ratio_gathered']:>5.2f} "
                        f"{rec['ideal']:>5.2f} {rec['gathered_GBps']:>6.0f} "
                        f"{rec['frac_copy_gathered']:>5.0%} {rec['frac_copy_compact']:>5.0%} "
                        f"{rec['frac_copy_dense']:>5.0%}",
                        flush=True,
                    )
                    del arm_sets
            del layers
            gc.collect()
            torch.cuda.empty_cache()
    return records


def run_quant_cuda(args):
    """CUDA: the gathered GLU FFN over bf16 rows (dart_ext.gathered_glu_ffn) and over each
    quantised format (gathered_glu_ffn_q), each arm one CUDA graph of --calls calls cycling over
    --layers weight copies, side by side with a device-to-device copy of the q4 arm's bytes (the
    100% line). Per arm: us per call, weight bytes read per second (kept rows + their scales /
    mins) and that bandwidth as a fraction of the copy's (bytes read + written per second)."""
    from dart_ext import quant

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    fmts = list(QUANT_FORMATS)
    print(
        f"device={torch.cuda.get_device_name(device)} layers={args.layers} calls={args.calls} "
        f"group={args.group} (us per call, medians; GB/s: kept-row bytes read per second; "
        "%cp: fraction of copy bandwidth)"
    )
    hdr = (
        f"{'shape':<13} {'T':>3} {'keep':>4} "
        + " ".join(f"{c:>7}" for c in ["bf16", *fmts, "copy"])
        + " "
        + " ".join(f"{c + '/bf':>7}" for c in fmts)
        + " "
        + " ".join(f"{c + ' %cp':>8}" for c in ["bf16", *fmts])
    )
    print(hdr)
    print("-" * len(hdr))
    records = []
    for shape in args.shapes:
        d, n = SHAPES[shape]
        layers = []
        for _ in range(args.layers):
            ws = [(torch.randn(n, d, device=device, generator=gen) * d**-0.5) for _ in range(3)]
            layer = {"bf16": [w.bfloat16() for w in ws]}
            for f in fmts:
                layer[f] = [quant.quantize_rows(w, f, args.group) for w in ws]
            layers.append(layer)
            del ws
        for T in args.tokens:
            x = torch.randn(T, d, device=device, generator=gen).bfloat16()
            for keep in args.keeps:
                k = max(1, round(keep * n))
                per_value = {f: quant.FORMATS[f].bytes_per_value(args.group) for f in fmts}
                per_value["bf16"] = 2.0
                kept_bytes = {a: 3 * k * d * b for a, b in per_value.items()}
                arm_sets = []
                for layer in layers:
                    idx = torch.randperm(n, device=device, generator=gen)[:k].sort().values
                    arms = {
                        "bf16": lambda w=layer["bf16"], idx=idx, x=x: dart_ext.gathered_glu_ffn(
                            x, *w, idx, "silu"
                        )
                    }
                    for f in fmts:
                        arms[f] = lambda w=layer[f], idx=idx, x=x: dart_ext.ops.gathered_glu_ffn_q(
                            x, *w, idx
                        )
                    src = torch.ones(int(kept_bytes["q4"]), device=device, dtype=torch.uint8)
                    dst = torch.empty_like(src)
                    arms["copy"] = lambda dst=dst, src=src: dst.copy_(src)
                    arm_sets.append(arms)
                t, modes = bench_arms_cuda(arm_sets, args.budget, args.max_reps, args.calls)
                copy_bw = 2 * kept_bytes["q4"] / (t["copy"] * 1e-6)
                bw = {a: kept_bytes[a] / (t[a] * 1e-6) for a in ["bf16", *fmts]}
                rec = {
                    "shape": shape,
                    "d": d,
                    "N": n,
                    "T": T,
                    "keep": keep,
                    "k": k,
                    "group": args.group,
                    "device": torch.cuda.get_device_name(device),
                    "layers": args.layers,
                    "calls": args.calls,
                    "timing": modes,
                    **{f"{a}_us": v for a, v in t.items()},
                    **{f"{a}_bytes": v for a, v in kept_bytes.items()},
                    **{f"{a}_GBps": v / 1e9 for a, v in bw.items()},
                    "copy_GBps": copy_bw / 1e9,
                    **{f"frac_copy_{a}": v / copy_bw for a, v in bw.items()},
                    **{f"ratio_{f}_bf16": t[f] / t["bf16"] for f in fmts},
                }
                records.append(rec)
                print(
                    f"{shape:<13} {T:>3} {keep:>4.2f} "
                    + " ".join(f"{t[a]:>7.1f}" for a in ["bf16", *fmts, "copy"])
                    + " "
                    + " ".join(f"{t[f] / t['bf16']:>7.2f}" for f in fmts)
                    + " "
                    + " ".join(f"{bw[a] / copy_bw:>8.0%}" for a in ["bf16", *fmts]),
                    flush=True,
                )
                del arm_sets
        del layers
        gc.collect()
        torch.cuda.empty_cache()
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
    p.add_argument("--calls", type=int, default=20, help="CUDA: calls per timed graph")
    p.add_argument("--layers", type=int, default=4, help="CUDA: weight copies the calls cycle")
    p.add_argument("--json", default=None, help="write the records as a JSON list here")
    p.add_argument(
        "--quant",
        action="store_true",
        help="gathered GLU FFN over bf16 vs q8 / q4 / q4m rows and a streaming read (CPU) or a "
        "device copy (CUDA)",
    )
    p.add_argument("--group", type=int, default=32, help="--quant: values per scale (32, 64)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.calls < 1 or args.layers < 1:
        p.error("--calls and --layers must be >= 1")
    q = args.quick
    if args.quant:
        if args.group not in (32, 64):
            p.error(f"--group must be 32 or 64, got {args.group}")
        args.shapes = args.shapes or (["llama-3.1-8b"] if cuda else ["qwen2.5-1.5b"])
        args.tokens = args.tokens or [1]
        args.keeps = args.keeps or ([1.0, 0.5, 0.3] if cuda else [1.0, 0.3])
        args.budget = args.budget or (0.5 if q else 2.0)
        args.max_reps = args.max_reps or (20 if q else 100)
        records = run_quant_cuda(args) if cuda else run_quant(args)
    else:
        if cuda:
            args.shapes = args.shapes or ["llama-3.1-8b"]
            args.tokens = args.tokens or [1, 4, 8, 16]
            args.dtypes = args.dtypes or ["bf16"]
            args.keeps = args.keeps or ([1.0, 0.5] if q else [1.0, 0.7, 0.5, 0.3])
        args.shapes = args.shapes or (["smollm2-135m", "llama-3.1-8b"])
        args.tokens = args.tokens or ([1, 16] if q else [1, 16, 256])
        args.dtypes = args.dtypes or ["fp32", "bf16"]
        args.keeps = args.keeps or ([1.0, 0.5, 0.3] if q else [1.0, 0.7, 0.5, 0.3, 0.1])
        args.budget = args.budget or (0.3 if q else 1.5)
        args.max_reps = args.max_reps or (30 if q else 200)
        records = run_cuda(args) if cuda else run(args)
    if args.json:
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
