"""The CUDA kernel cores (csrc/kernels/*.cuh) run on the CPU emulation of the CUDA execution
model (csrc/emu/, built by tests/emulation.py) against numpy references: the emulation itself
(warp collectives, barriers, atomics, conversions, and that each misuse fails the launch), topk
on hard inputs and every size class, gather_rows on every copy unit, determinism across reruns
and schedules, and the whole emulated suite once more under ASan + UBSan.

No GPU is needed: these tests run everywhere, CI included. What emulation cannot show is listed
in docs/ARCHITECTURE.md (inter-block concurrency, the memory model, speed, the ATen glue).
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import zlib

import emulation as emu
import numpy as np
import pytest
import torch

C = ctypes.c_longlong
# The sanitizer run replays this module with fewer sizes (ASan slows the fibers ~5x).
FULL = emu.current_config() == "plain"


@pytest.fixture(autouse=True)
def default_schedule():
    emu.reset_schedule()
    yield
    emu.reset_schedule()


def launch(code: int) -> None:
    emu.check(code)


# ---------------------------------------------------------------------------------------------
# The emulation itself


def test_half_conversions_are_bit_exact():
    every_half = np.arange(1 << 16, dtype=np.uint16)
    as_float = emu.bits_to_float(every_half, "float16")
    ref = every_half.view(np.float16).astype(np.float32)
    finite = ~np.isnan(ref)
    assert np.array_equal(as_float[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.isnan(as_float[~finite]).all()

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    # every halfway point between neighbouring halves (ties to even), and its neighbours
    halves = every_half[np.isfinite(every_half.view(np.float16))].view(np.float16)
    mids = (halves[:-1].astype(np.float64) + halves[1:].astype(np.float64)) / 2
    mids = mids.astype(np.float32).view(np.uint32)
    bits = np.concatenate([bits, mids, mids - 1, mids + 1, np.array([0x7F800000, 0xFF800000])])
    x = bits.view(np.float32)
    got = emu.float_to_bits(x, "float16")
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert (got[nan] == 0x7FFF).all()  # canonical NaN, like cvt.rn.f16.f32


def test_bfloat16_conversions_are_bit_exact():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, size=4096, dtype=np.uint32) << 16) | 0x8000
    bits = np.concatenate([bits, ties, np.array([0x7F7FFFFF, 0x7F800000, 0x00000001, 0x80000000])])
    x = bits.view(np.float32)
    got = emu.float_to_bits(x, "bfloat16")
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], want[~nan])
    assert (got[nan] == 0x7FFF).all()
    every = np.arange(1 << 16, dtype=np.uint16)
    back = emu.bits_to_float(every, "bfloat16")
    assert np.array_equal(back.view(np.uint32), every.astype(np.uint32) << 16)


def _warp_ops_reference(block: int, width: int, arg: int) -> np.ndarray:
    lanes = np.arange(32)
    v = 100 * block + lanes
    seg, sub = lanes & ~(width - 1), lanes & (width - 1)
    up = np.where(sub >= arg, v[np.clip(lanes - arg, 0, 31)], v)
    down = np.where(sub + arg < width, v[np.clip(lanes + arg, 0, 31)], v)
    xsrc = lanes ^ (arg & 31)
    xor = np.where(xsrc < seg + width, v[xsrc], v)
    ballot = np.int64(sum(1 << lane for lane in range(0, 32, 3)))
    match = np.array([sum(1 << s for s in range(32) if s % 5 == lane % 5) for lane in lanes])
    half_xor = (0.5 * (lanes ^ 1)).astype(np.float32).view(np.int32)
    rows = [
        v[seg + (arg & (width - 1))],
        up,
        down,
        xor,
        np.full(32, ballot).astype(np.uint32).view(np.int32),
        np.full(32, 1),
        np.full(32, 0),
        match.astype(np.uint32).view(np.int32),
        np.full(32, sum(range(32))),
        np.full(32, 31),
        half_xor,
    ]
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("width,arg", [(32, 0), (32, 5), (32, 31), (16, 3), (8, 7), (4, 1), (1, 0)])
def test_warp_collectives_follow_cuda_semantics(width, arg):
    blocks = 3
    out = np.zeros((blocks, 11, 32), dtype=np.int32)
    launch(emu.library().dart_emu_selftest_warp_ops(emu.ptr(out), blocks, width, arg))
    for b in range(blocks):
        np.testing.assert_array_equal(out[b], _warp_ops_reference(b, width, arg), err_msg=f"{b}")


@pytest.mark.parametrize("threads,live", [(64, 64), (96, 40), (1024, 1000), (256, 1), (33, 33)])
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_barrier_excludes_threads_that_returned(threads, live, schedule):
    emu.set_schedule(schedule, seed=threads)
    out = np.full(threads + 1, -1, dtype=np.int32)
    launch(emu.library().dart_emu_selftest_barrier(emu.ptr(out), threads, live))
    t = np.arange(live)
    np.testing.assert_array_equal(out[:live], 3 * ((t + 1) % live) + 1)
    assert out[threads] == live  # __syncthreads_count over the live threads


def test_atomics_count_every_thread_of_every_block():
    i = np.zeros(1, dtype=np.int32)
    f = np.zeros(1, dtype=np.float32)
    u = np.zeros(1, dtype=np.uint64)
    launch(emu.library().dart_emu_selftest_atomics(emu.ptr(i), emu.ptr(f), emu.ptr(u), 7, 96))
    assert i[0] == 7 * 96 and u[0] == 7 * 96 and f[0] == 0.5 * 7 * 96


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random"])
def test_atomics_votes_and_bit_intrinsics(schedule):
    emu.set_schedule(schedule, seed=3)
    t = np.arange(64)
    out = np.array([0, -1, 10**6, 0, -1, 0, 0, 0] + [0] * 8, dtype=np.int32)
    launch(emu.library().dart_emu_selftest_atomics_family(emu.ptr(out)))
    bits = np.bitwise_or.reduce(1 << (t % 31))
    assert out[0] == -t.sum() and out[1] == ((t * 37) % 101).max() and out[2] == 1000 - 63
    assert out[3] == bits and out[4] == ~bits and out[5] == np.bitwise_xor.reduce(t)
    assert out[6] == 1234 and 1 <= out[7] <= 64  # the CAS chain depends on the order
    assert list(out[8:11]) == [0, 1, 10]
    assert list(out[12:16]) == [np.int32(np.uint32(0x80000000)), 31, 4, 8]


@pytest.mark.parametrize(
    "which,code,words",
    [
        (1, 801, "mask 0x0000ffff"),
        (2, 719, "returned"),
        (3, 719, "warp"),
        (4, 716, "misaligned address"),
        (5, 710, "lane 7 is out of range"),
        (6, 716, "__stcg"),
        (7, 716, "atomicAdd"),
        (8, 801, "__activemask"),
    ],
)
def test_misuse_fails_the_launch_with_a_message(which, code, words):
    data = np.zeros(64, dtype=np.float32)
    out = np.zeros(64, dtype=np.int32)
    with pytest.raises(emu.EmulationError) as e:
        launch(emu.library().dart_emu_selftest_misuse(which, emu.ptr(data), emu.ptr(out)))
    assert e.value.code == code
    assert words in e.value.message and "block (0,0,0) thread" in e.value.message
    # the next launch is clean again
    launch(emu.library().dart_emu_selftest_misuse(0, emu.ptr(data), emu.ptr(out)))


@pytest.mark.parametrize(
    "grid,block",
    [
        ((1, 1, 1), (1025, 1, 1)),
        ((0, 1, 1), (32, 1, 1)),
        ((1, 65536, 1), (32, 1, 1)),
        ((1, 1, 1), (1, 1, 65)),
    ],
)
def test_invalid_launch_configurations_are_rejected(grid, block):
    out = np.zeros(64, dtype=np.int32)
    with pytest.raises(emu.EmulationError) as e:
        launch(emu.library().dart_emu_selftest_config(*grid, *block, emu.ptr(out)))
    assert e.value.code == 9 and "invalid" in e.value.message


def test_dynamic_shared_memory_is_fresh_per_block_and_needs_opt_in_above_48k():
    lib = emu.library()
    out = np.zeros(1 + 256, dtype=np.int32)
    launch(lib.dart_emu_selftest_dynamic_smem(emu.ptr(out), 256, 4096, 0))
    assert out[0] == -1  # 0xff bytes: never written in this block
    np.testing.assert_array_equal(out[1:], ((np.arange(256) + 1) % 256) ** 2)
    big = 64 << 10
    with pytest.raises(emu.EmulationError) as e:
        launch(lib.dart_emu_selftest_dynamic_smem(emu.ptr(out), 256, big, 0))
    assert "cudaFuncSetAttribute" in e.value.message
    launch(lib.dart_emu_selftest_dynamic_smem(emu.ptr(out), 256, big, big))
    assert out[0] == -1
    with pytest.raises(emu.EmulationError):  # beyond the device's opt-in limit
        launch(lib.dart_emu_selftest_dynamic_smem(emu.ptr(out), 256, 240 << 10, 240 << 10))


def test_schedules_expose_a_missing_barrier():
    results = []
    for schedule in ["forward", "reverse"]:
        emu.set_schedule(schedule)
        out = np.zeros(256, dtype=np.int32)
        launch(emu.library().dart_emu_selftest_racy(emu.ptr(out)))
        results.append(out)
    assert not np.array_equal(results[0], results[1])


# ---------------------------------------------------------------------------------------------
# topk_indices


def encode(x32: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(buffer passed to the kernel, the fp32 values the kernel sees), converted by numpy /
    torch (not by the emulation)."""
    if dtype == "float32":
        x = np.ascontiguousarray(x32, dtype=np.float32)
        return x, x
    if dtype == "float16":
        with np.errstate(over="ignore"):
            h = np.ascontiguousarray(x32.astype(np.float16))
        return h.view(np.uint16), h.astype(np.float32)
    b = torch.from_numpy(np.ascontiguousarray(x32, dtype=np.float32)).to(torch.bfloat16)
    return b.view(torch.int16).numpy().view(np.uint16), b.float().numpy()


def topk_reference(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, NaN as -inf, -0 == +0, ties to the lower index,
    returned ascending."""
    v = np.where(np.isnan(values), -np.inf, values).astype(np.float64)
    order = np.argsort(-v, axis=-1, kind="stable")  # -(+0) == -(-0): ties kept in index order
    return np.sort(order[:, :k], axis=-1)


def run_topk(buf: np.ndarray, dtype: str, k: int, block: int, num_sms: int = 132) -> np.ndarray:
    rows, n = buf.shape
    out = np.full((rows, k), -7, dtype=np.int64)
    code = emu.library().dart_emu_topk_indices(
        emu.DTYPES[dtype], emu.ptr(buf), C(rows), n, k, emu.ptr(out), block, num_sms
    )
    launch(code)
    return out


def dart_like_scores(rng: np.random.Generator, rows: int, n: int, tokens: int = 6) -> np.ndarray:
    """Scores like DART's L2 accumulators: sqrt(sum_t (silu(g) * u)^2) with per-neuron scales,
    all positive within a few binary orders of magnitude (nearly every key in a few radix
    bins of the first pass)."""
    g = rng.standard_normal((rows, n, tokens))
    u = rng.standard_normal((rows, n, tokens))
    a = g / (1 + np.exp(-g)) * u * rng.lognormal(0.0, 0.3, size=(1, n, 1))
    return np.sqrt((a**2).sum(-1)).astype(np.float32)


def special_values(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    pool = np.array(
        [
            np.nan,
            -np.nan,
            np.inf,
            -np.inf,
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            1.4e-45,
            5e-39,
            1.0,
            -1.0,
            3.0e38,
            -3.0e38,
            1e-8,
            6.0e-8,
            65504.0,
            70000.0,
        ],
        dtype=np.float32,
    )
    return pool[rng.integers(0, len(pool), size=(rows, n))]


DISTRIBUTIONS = {
    "randn": lambda rng, r, n: rng.standard_normal((r, n)).astype(np.float32),
    "dart": dart_like_scores,
    "ties": lambda rng, r, n: rng.integers(0, 4, size=(r, n)).astype(np.float32),
    "special": special_values,
    "denormal": lambda rng, r, n: (rng.standard_normal((r, n)) * 1e-39).astype(np.float32),
    "all_nan": lambda rng, r, n: np.full((r, n), np.nan, dtype=np.float32),
    "signed_zero": lambda rng, r, n: np.where(rng.random((r, n)) < 0.5, -0.0, 0.0).astype(
        np.float32
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("block", [256, 1024])
def test_topk_hard_inputs(dtype, dist, block):
    rng = np.random.default_rng(zlib.crc32(f"{dtype}-{dist}-{block}".encode()))
    n = 3000 if FULL else 700
    x = DISTRIBUTIONS[dist](rng, 2, n)
    buf, seen = encode(x, dtype)
    for k in [1, 257, n // 2, n - 1, n]:
        np.testing.assert_array_equal(
            run_topk(buf, dtype, k, block), topk_reference(seen, k), err_msg=f"k={k}"
        )


SIZES = [1, 2, 3, 31, 32, 33, 255, 256, 257, 1023, 1024, 1025, 2049, 4096]
if not FULL:
    SIZES = [1, 33, 257, 1025]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", [256, 1024])
def test_topk_every_size_and_k(n, block):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n)).astype(np.float32)
    x[1, rng.integers(0, n, size=n // 3)] = np.nan  # second row: some NaNs
    for k in sorted({1, max(1, n // 2), max(1, n - 1), n}):
        np.testing.assert_array_equal(run_topk(x, "float32", k, block), topk_reference(x, k))


def test_topk_rows_are_independent():
    rng = np.random.default_rng(7)
    n, k = 600, 100
    x = np.stack(
        [DISTRIBUTIONS[d](rng, 1, n)[0] for d in ["all_nan", "dart", "ties", "special", "randn"]]
    )
    np.testing.assert_array_equal(run_topk(x, "float32", k, 256), topk_reference(x, k))


@pytest.mark.parametrize(
    "rows,n,num_sms,expected_block",
    [(2, 4096, 132, 1024), (2, 4095, 132, 256), (8, 4096, 4, 1024), (9, 4096, 4, 256)],
)
def test_topk_launcher_picks_the_block_size(rows, n, num_sms, expected_block):
    """One 1024-thread CTA per row for few long rows (decode), 256 threads otherwise."""
    x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
    emu.reset_counters()
    out = run_topk(x, "float32", 5, 0, num_sms=num_sms)
    assert emu.counter("threads") == rows * expected_block
    np.testing.assert_array_equal(out, topk_reference(x, 5))


@pytest.mark.parametrize("k,n", [(0, 10), (11, 10)])
def test_topk_launcher_rejects_bad_k(k, n):
    x = np.zeros((1, n), dtype=np.float32)
    out = np.zeros((1, max(k, 1)), dtype=np.int64)
    code = emu.library().dart_emu_topk_indices(0, emu.ptr(x), C(1), n, k, emu.ptr(out), 256, 132)
    assert code == 1  # cudaErrorInvalidValue, before any launch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_topk_is_deterministic_across_reruns_and_schedules(dtype):
    rng = np.random.default_rng(3)
    buf, seen = encode(dart_like_scores(rng, 3, 2500), dtype)
    ref = topk_reference(seen, 1000)
    for schedule, seed in [("forward", 0), ("forward", 0), ("reverse", 0), ("random", 1)]:
        emu.set_schedule(schedule, seed)
        for block in [256, 1024]:
            np.testing.assert_array_equal(run_topk(buf, dtype, 1000, block), ref)


def radix_histogram_atomics(keys: np.ndarray, k: int, last_shift: int) -> tuple[list, list]:
    """Per radix pass of topk.cuh over one row of uint32 keys (the kernel's selection replayed
    in numpy): the atomics of a warp-aggregated histogram and those of a per-element one."""
    prefix, mask, remaining, aggregated, per_element = 0, 0, k, [], []
    for shift in range(24, last_shift - 1, -8):
        valid = (keys & mask) == prefix
        digits = (keys >> shift) & 0xFF
        per_element.append(int(valid.sum()))
        aggregated.append(0)
        for c in range(0, len(keys), 32):  # a warp's 32 consecutive elements per iteration
            aggregated[-1] += len(np.unique(digits[c : c + 32][valid[c : c + 32]]))
        hist = np.bincount(digits[valid], minlength=256)
        above = np.concatenate([[0], np.cumsum(hist[::-1])])  # elements in bins above b
        b = 255 - int(np.searchsorted(above[1:], remaining))  # the bin holding the k-th
        remaining -= int(above[255 - b])
        prefix, mask = prefix | (b << shift), mask | (0xFF << shift)
        if hist[b] == remaining:
            break
    return aggregated, per_element


@pytest.mark.parametrize(
    "dtype,dist,last_shift",
    [
        ("float32", "dart", 0),
        ("bfloat16", "dart", 16),
        ("float32", "ties", 0),
        ("float32", "randn", 0),
    ],
)
def test_topk_histogram_is_warp_aggregated(dtype, dist, last_shift):
    """One atomic per distinct bin per warp, and only the passes the element type needs: in the
    first pass over DART-like scores (positive, a narrow exponent range: a few bins per warp)
    and over ties that is a small fraction of one atomic per element."""
    n, k = 3000, 900
    buf, seen = encode(DISTRIBUTIONS[dist](np.random.default_rng(5), 1, n), dtype)
    u = seen[0].view(np.uint32)
    keys = np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000)).astype(np.int64)
    aggregated, per_element = radix_histogram_atomics(keys, k, last_shift)
    emu.reset_counters()
    np.testing.assert_array_equal(run_topk(buf, dtype, k, 256), topk_reference(seen, k))
    assert emu.counter("atomics") == sum(aggregated)
    assert len(aggregated) <= (24 - last_shift) // 8 + 1
    if dist != "randn":
        assert aggregated[0] < per_element[0] / 4


# ---------------------------------------------------------------------------------------------
# gather_rows


def run_gather(
    srcs,
    src_offsets,
    src_stride,
    idx,
    k,
    groups,
    out,
    out_offset,
    out_row_stride,
    out_group_stride,
    row_bytes,
    s_base=0,
    lens=None,
):
    n = len(srcs)
    src_ptrs = (ctypes.c_void_p * n)(
        *[s.ctypes.data + o for s, o in zip(srcs, src_offsets, strict=True)]
    )
    strides = (C * n)(*[src_stride] * n)
    nrows = (C * n)(*[(len(s) - o) // src_stride for s, o in zip(srcs, src_offsets, strict=True)])
    unit = ctypes.c_int(0)
    code = emu.library().dart_emu_gather_rows(
        n,
        src_ptrs,
        strides,
        nrows,
        ctypes.c_void_p(out.ctypes.data + out_offset),
        C(out_group_stride),
        C(out_row_stride),
        C(s_base),
        emu.ptr(idx),
        C(k if idx.ndim == 2 else 0),
        None if lens is None else emu.ptr(lens),
        C(k),
        C(groups),
        C(row_bytes),
        ctypes.byref(unit),
    )
    launch(code)
    return unit.value


@pytest.mark.parametrize(
    "row_bytes,src_stride,src_off,out_off,unit",
    [
        (256, 272, 0, 0, 16),  # bf16 d = 128, padded rows
        (96, 96, 8, 0, 8),
        (36, 40, 4, 4, 4),
        (14, 14, 2, 0, 2),
        (7, 9, 1, 3, 1),
        (4096, 4096, 0, 16, 16),
    ],
)
@pytest.mark.parametrize("nsrc,per_sequence", [(1, False), (3, False), (2, True)])
def test_gather_rows_every_copy_unit(
    row_bytes, src_stride, src_off, out_off, unit, nsrc, per_sequence
):
    rng = np.random.default_rng(row_bytes * 10 + nsrc)
    n_rows, k, groups = 50, 37, (3 if per_sequence else 1)
    srcs = [
        rng.integers(0, 256, size=src_off + n_rows * src_stride, dtype=np.uint8)
        for _ in range(nsrc)
    ]
    idx = rng.integers(0, n_rows, size=(groups, k) if per_sequence else (k,)).astype(np.int64)
    out_row_stride = row_bytes + (16 if unit == 16 else unit * 3)
    out_group_stride = nsrc * k * out_row_stride + 2 * unit
    out = np.full(out_off + groups * out_group_stride, 0xAB, dtype=np.uint8)
    before = out.copy()
    got_unit = run_gather(
        srcs,
        [src_off] * nsrc,
        src_stride,
        idx,
        k,
        groups,
        out,
        out_off,
        out_row_stride,
        out_group_stride if per_sequence else 0,
        row_bytes,
    )
    assert got_unit == unit
    want = before.copy()
    for g in range(groups):
        gi = idx[g] if per_sequence else idx
        for s in range(nsrc):
            for j in range(k):
                src_at = src_off + gi[j] * src_stride
                at = out_off + g * out_group_stride + (s * k + j) * out_row_stride
                want[at : at + row_bytes] = srcs[s][src_at : src_at + row_bytes]
    np.testing.assert_array_equal(out, want)  # rows copied, gaps untouched


def test_gather_rows_per_group_lengths_zero_the_padding():
    """Rows past a group's length are zero and their (garbage) indices never read."""
    rng = np.random.default_rng(5)
    n_rows, k, nsrc, row_bytes = 20, 6, 2, 48
    srcs = [rng.integers(1, 256, size=n_rows * row_bytes, dtype=np.uint8) for _ in range(nsrc)]
    lens = np.array([0, 1, 6, 3], dtype=np.int64)
    idx = rng.integers(0, n_rows, size=(len(lens), k)).astype(np.int64)
    for g, n in enumerate(lens):
        idx[g, n:] = -(10**12)  # out of range: reading it would be a device error
    group_stride = nsrc * k * row_bytes
    out = np.full(len(lens) * group_stride, 0xAB, dtype=np.uint8)
    args = (idx, k, len(lens), out, 0, row_bytes, group_stride, row_bytes)
    run_gather(srcs, [0] * nsrc, row_bytes, *args, lens=lens)
    rows = out.reshape(len(lens), nsrc, k, row_bytes)
    for g, n in enumerate(lens):
        for s in range(nsrc):
            want = srcs[s].reshape(n_rows, row_bytes)[idx[g, :n]]
            np.testing.assert_array_equal(rows[g, s, :n], want)
            assert not rows[g, s, n:].any()


def test_gather_rows_source_block_offset_and_range_check():
    rng = np.random.default_rng(11)
    src = rng.integers(0, 256, size=20 * 32, dtype=np.uint8)
    idx = np.array([3, 19, 0], dtype=np.int64)
    out = np.zeros(4 * 3 * 32, dtype=np.uint8)  # sources 0..3, this launch fills source 2
    run_gather([src], [0], 32, idx, 3, 1, out, 0, 32, 0, 32, s_base=2)
    rows = out.reshape(4 * 3, 32)
    np.testing.assert_array_equal(rows[6:9], src.reshape(20, 32)[idx])
    assert not rows[:6].any() and not rows[9:].any()
    bad = np.array([3, 20, 0], dtype=np.int64)
    with pytest.raises(emu.EmulationError) as e:
        run_gather([src], [0], 32, bad, 3, 1, out, 0, 32, 0, 32)
    assert e.value.code == 710 and "idx out of range" in e.value.message


def test_gather_rows_is_deterministic_across_schedules():
    rng = np.random.default_rng(12)
    src = rng.integers(0, 256, size=64 * 128, dtype=np.uint8)
    idx = rng.integers(0, 64, size=(2, 40)).astype(np.int64)
    outs = []
    for schedule in ["forward", "reverse", "random"]:
        emu.set_schedule(schedule, 5)
        out = np.zeros(2 * 40 * 128, dtype=np.uint8)
        run_gather([src], [0], 128, idx, 40, 2, out, 0, 128, 40 * 128, 128)
        outs.append(out)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------------------------------------
# The whole emulated suite under ASan + UBSan


@pytest.mark.skipif(not FULL, reason="this is the sanitizer run itself")
def test_emulated_suite_under_asan_ubsan():
    """Replays every emulated test module with the `sanitize` build (ASan + UBSan, any finding
    fatal) in a child process that preloads the ASan runtime."""
    emu.build("sanitize")  # a compile error shows here, not as a child crash
    env = emu.sanitizer_env()
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-x",
        "-s",
        "-p",
        "no:cacheprovider",
        *emu.EMULATED_TEST_MODULES,
    ]
    r = subprocess.run(cmd, cwd=emu.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-6000:]
    assert "passed" in r.stdout and "failed" not in r.stdout
