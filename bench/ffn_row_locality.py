"""What scattered kept neurons cost the gathered quantised FFN op (CPU, one token, no model load).

DART keeps a fraction of each layer's neurons, and the kept rows lie scattered over the neuron-
major gate, up and down matrices. This times `dart::gathered_glu_ffn_q` at one token over the
same number of kept neurons laid out three ways: a random sorted set (what a mask looks like),
the first k neurons (one contiguous run per matrix: the bytes-only ideal), and random runs of
`block` adjacent neurons. Weights are random q4/q8 rows of a model's FFN shape, cycled over
enough copies that they come from memory; wall-time medians. `read` is a plain streaming read of
the same bytes (the first k rows' data and scales of the three matrices, `amax` over bytes), and
`%read` the op's speed as a fraction of it (issue 21's op goal: 80% at one token).

(A `--split` mode that estimated the down rows' share as 2 MLP - GLU was removed: the parts do
not add, since a GLU neuron's two input rows share each activation block; `perf` puts the down
rows at about a third of the op's time, in proportion to their bytes. docs/RESULTS.md.)

    python bench/ffn_row_locality.py --keeps 1.0 0.5 0.3 0.1 --blocks 2 4 8 16 --threads 1 2
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

SHAPES = {"qwen2.5-1.5b": (1536, 8960), "llama-3.1-8b": (4096, 14336)}


def block_indices(n: int, k: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """k kept neurons of n as random runs of `block` adjacent ones (block 1: a random set)."""
    starts = torch.randperm(n // block, generator=gen)[: k // block].sort().values * block
    return (starts[:, None] + torch.arange(block)).flatten()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    p.add_argument("--fmt", default="q4", choices=sorted(quant.FORMATS))
    p.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.1])
    p.add_argument("--blocks", type=int, nargs="*", default=[4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--copies", type=int, default=6, help="weight copies cycled (beyond the LLC)")
    p.add_argument("--reps", type=int, default=60)
    args = p.parse_args(argv)
    d, n = SHAPES[args.shape]
    gen = torch.Generator().manual_seed(0)
    ffn = [
        [
            quant.quantize_rows(torch.randn(n, d, generator=gen) * d**-0.5, args.fmt).tensors()
            for _ in range(3)
        ]
        for _ in range(args.copies)
    ]
    x = torch.randn(1, d, generator=gen)

    def median_ms(fn) -> float:
        walls = []
        for i in range(args.reps):
            start = time.perf_counter()
            fn(i)
            walls.append(time.perf_counter() - start)
        return 1000.0 * statistics.median(walls)

    def ms(idx: torch.Tensor) -> float:
        return median_ms(
            lambda i: torch.ops.dart.gathered_glu_ffn_q(
                x, *ffn[i % len(ffn)], args.fmt, 32, idx, "silu"
            )
        )

    def read_ms(k: int) -> float:
        """A streaming read of the bytes the first k neurons' rows occupy."""
        views = [[t[:k].view(torch.uint8) for m in copy for t in m] for copy in ffn]
        return median_ms(lambda i: [v.amax() for v in views[i % len(views)]])

    blocks = [b for b in args.blocks if b > 1]
    print(
        f"shape={args.shape} fmt={args.fmt} (ms per call, one token; ratio = runs / first k, "
        "the bytes-only ideal)"
    )
    head = (
        f"{'thr':>3} {'keep':>5} {'read':>7} {'first k':>8} {'%read':>6} {'random':>8} {'%read':>6}"
    )
    print(head + "".join(f" {f'runs of {b}':>10} {'ratio':>6}" for b in blocks))
    for threads in args.threads:
        torch.set_num_threads(threads)
        for keep in args.keeps:
            k = max(1, round(keep * n))
            read = read_ms(k)
            ideal = ms(torch.arange(k))
            rnd = ms(block_indices(n, k, 1, gen))
            line = (
                f"{threads:>3} {keep:>5.2f} {read:>7.3f} {ideal:>8.3f} {read / ideal:>6.0%} "
                f"{rnd:>8.3f} {read / rnd:>6.0%}"
            )
            for b in blocks:
                t = ms(block_indices(n, k - k % b, b, gen))
                line += f" {t:>10.3f} {t / ideal:>6.2f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
