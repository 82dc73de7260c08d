"""The quantised ops of one decode token of a model shape, timed one by one on CPU (no model load).

For each op a token runs (per layer: the q, k, v, o linears and the gated FFN, dense or over a
kept fraction; once: the LM head) the op is called on random quantised weights of that shape,
cycling over enough copies that the rows come from memory, and timed by the calling thread's CPU
time (`time.thread_time`) as well as by wall time. With one thread the CPU time does not count
the time the thread waited for a core, so on a shared, loaded machine it stays close to what a
quiet machine measures (memory bandwidth is still shared); the wall time is printed beside it.
Run with --threads 1 when the machine is loaded; the per-token sums are op time only (no
attention, norms, Python or compiled-graph glue).

    python bench/quant_step_ops.py --fmt q4 --keeps 1.0 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dart_ext  # noqa: E402,F401  (registers the ops)
from dart_ext import quant  # noqa: E402

# d, N (FFN), layers, heads * head_dim (q / o rows), kv rows (k, v), vocab
SHAPES = {"qwen2.5-1.5b": (1536, 8960, 28, 1536, 256, 151936)}


def timed(fn, reps: int) -> tuple[float, float]:
    """(median thread-CPU ms, median wall ms) of `fn(i)` over reps calls."""
    cpu, wall = [], []
    for i in range(reps):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn(i)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.thread_time() - c0)
    return 1e3 * statistics.median(cpu), 1e3 * statistics.median(wall)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    p.add_argument("--fmt", default="q4", choices=sorted(quant.FORMATS))
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--copies", type=int, default=4, help="weight copies cycled per op")
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d, n, layers, q_rows, kv_rows, vocab = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(0)

    def qrows(rows: int, cols: int, copies: int):
        return [
            quant.quantize_rows(
                torch.randn(rows, cols, generator=gen) * cols**-0.5, args.fmt, args.group
            ).tensors()
            for _ in range(copies)
        ]

    x = torch.randn(1, d, generator=gen)
    fmt, g = args.fmt, args.group
    print(
        f"shape={args.shape} fmt={fmt} group={g} threads={torch.get_num_threads()} "
        f"(median ms per call: thread CPU / wall; per token = calls per token x CPU)"
    )
    rows = []
    # enough copies of the small linears to exceed the last-level cache (64 MB), as 28 layers do
    per_value = quant.FORMATS[fmt].bytes_per_value(g)
    lin = {
        name: qrows(r, d, max(args.copies, -(-(64 << 20) // int(r * d * per_value))))
        for name, r in (("q/o", q_rows), ("k/v", kv_rows))
    }
    for name, ws in lin.items():
        c, w = timed(
            lambda i, ws=ws: torch.ops.dart.linear_q(x, ws[i % len(ws)], fmt, g, None),
            4 * args.reps,
        )
        rows.append((f"linear {name}", c, w, 2 * layers))
    head = qrows(vocab, d, 1)[0]
    c, w = timed(lambda i: torch.ops.dart.linear_q(x, head, fmt, g, None), max(4, args.reps // 4))
    rows.append(("lm head", c, w, 1))
    ffn = [qrows(n, d, 3) for _ in range(args.copies)]
    for keep in args.keeps:
        k = max(1, round(keep * n))
        idx = torch.randperm(n, generator=gen)[:k].sort().values
        c, w = timed(
            lambda i, idx=idx: torch.ops.dart.gathered_glu_ffn_q(
                x, *ffn[i % len(ffn)], fmt, g, idx, "silu"
            ),
            args.reps,
        )
        rows.append((f"ffn keep {keep:.2f}", c, w, layers))
    print(f"{'op':<16} {'cpu ms':>8} {'wall ms':>8} {'calls':>5} {'ms/token':>9}")
    for name, c, w, calls in rows:
        print(f"{name:<16} {c:>8.3f} {w:>8.3f} {calls:>5} {c * calls:>9.2f}")
    fixed = sum(c * calls for name, c, _, calls in rows if not name.startswith("ffn"))
    for name, c, _, calls in rows:
        if name.startswith("ffn"):
            print(f"token ops with {name}: {fixed + c * calls:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
