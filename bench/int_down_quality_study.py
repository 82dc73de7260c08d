"""Study: the quality cost of an integer down projection, simulated in PyTorch (no kernel).
Built into the kernels on 2026-12-08 it gained no speed and was not kept (docs/RESULTS.md).

Tiles of 4 kept neurons (inside ffn_small's 16 chunks), per block of 32 outputs the tile's
coefficients c_r = h_r * scale_r[block] rounded to int8 with one fp32 scale (amax / 127, half to
even), the integer sums scaled once per block; the q4 offset either from the rounded k
(-8 * S * sum k) or in fp32 (-8 * sum c). Prints y's error against the fp32 down projection on
Qwen2.5-1.5B shapes with random q4 / q8 weights (bench/int_down_study.cpp times the kernel).

    PYTHONPATH=$PWD python bench/int_down_quality_study.py
"""

import torch

from dart_ext import quant

torch.manual_seed(0)
d, N = 1536, 8960


def run(keep: float, fmt: str, heavy: bool) -> None:
    wg, wu, wd = (quant.quantize_rows(torch.randn(N, d) * d**-0.5, fmt, 32) for _ in range(3))
    x = torch.randn(4, d)
    if heavy:
        x[:, :8] *= 30  # a few outlier channels, as real residual streams have
    k = round(keep * N)
    idx = torch.randperm(N)[:k]
    G, U, D = (quant.dequantize_rows(w)[idx] for w in (wg, wu, wd))
    xq = quant.quantize_activations(x)
    h = torch.nn.functional.silu(xq @ G.T) * (xq @ U.T)  # [T, k]
    y = h @ D
    # integer route: tiles of 4 within 16 chunks (ffn_small's chunking)
    s = wd.scales.float()[idx]  # [k, nb]
    u = quant._unpack4(wd.data[idx]).float() if fmt != "q8" else wd.data[idx].float()
    T, nb = h.shape[0], d // 32
    yi = torch.zeros(T, d)
    yo = torch.zeros(T, d)
    bounds = [k * c // 16 for c in range(17)]
    for c in range(16):
        for j in range(bounds[c], bounds[c + 1], 4):
            sl = slice(j, min(j + 4, bounds[c + 1]))
            coef = h[:, sl, None] * s[None, sl]  # [T, r, nb]
            amax = coef.abs().amax(1, keepdim=True)
            inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
            kq = torch.round(coef * inv).clamp(-127, 127)
            S = amax / 127
            ub = u[sl].reshape(-1, nb, 32)  # [r, nb, 32]
            dot = torch.einsum("trb,rbi->tbi", kq, ub)  # integer sums
            if fmt == "q8":
                yi += (S[:, 0, :, None] * dot).reshape(T, d)
                yo = yi
            else:
                ks = kq.sum(1)  # [T, nb]
                yi += (S[:, 0, :, None] * (dot - 8 * ks[..., None])).reshape(T, d)  # offset from k
                off = coef.sum(1) * -8  # fp32 offset (brief's variant)
                yo += (S[:, 0, :, None] * dot + off[..., None]).reshape(T, d)
    for name, yy in (("offset from int k", yi), ("offset in fp32", yo)):
        if fmt == "q8" and name != "offset from int k":
            continue
        rel = (yy - y).norm(dim=1) / y.norm(dim=1)
        ele = (yy - y).abs() / y.abs().mean(1, keepdim=True)
        print(
            f"{fmt} keep {keep} outliers={heavy} {name:18}: "
            f"rel L2 err mean {rel.mean():.2e} max {rel.max():.2e}; "
            f"max |err|/mean|y| {ele.max():.2e}"
        )


if __name__ == "__main__":
    for fmt in ("q4", "q8"):
        for keep in (1.0, 0.3):
            for heavy in (False, True):
                run(keep, fmt, heavy)
