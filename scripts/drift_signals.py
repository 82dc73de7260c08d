"""Which drift signal tells a topic switch from a plain continuation?

Streams: a prompt of P tokens from document A, then C tokens from A (no switch) or from the
same offset of another document B (switch). The model runs dense and teacher-forced (one
batched forward per group of streams, eager attention); each watched layer's attention output,
attention weights and attention input are captured and fed to the drift monitors exactly as a
prefill of P tokens followed by C one-token decode passes would feed them (the attention row of
query q covers keys 0..q either way). Each monitor takes its baseline and threshold from the
prompt; no re-trace follows (the monitor only watches), so every stream gives C / w windows.

Reported per monitor: the fraction of monitored windows with similarity below the threshold in
switch and in no-switch streams, the fraction of streams the hysteresis would fire on
(pressure_trigger windows net below tau), and the mean similarity gap.

    nice python scripts/drift_signals.py --docs 12 --corpora wiki c4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dart import load_model
from dart.assets.data import load_documents, split_documents
from dart.core.config import DriftConfig
from dart.core.drift import make_monitor

MONITORS = {
    "attn_output": {"signal": "attn_output"},
    "attn_probs (distance buckets)": {"signal": "attn_probs"},
    "attn_content bits=3": {"signal": "attn_content", "content_bits": 3},
    "attn_content bits=4": {"signal": "attn_content", "content_bits": 4},
}


def streams(tok, corpus: str, docs: int, p: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[docs, P + C]` token ids without and with a switch (eval split, documents long enough
    for P + C tokens; B = the next such document)."""
    ids = []
    for text in split_documents(load_documents(corpus), "eval"):
        t = tok(text, return_tensors="pt")["input_ids"][0]
        if len(t) >= p + c:
            ids.append(t[: p + c])
        if len(ids) == docs + 1:
            break
    if len(ids) < docs + 1:
        raise ValueError(f"{corpus}: only {len(ids)} eval documents have {p + c} tokens")
    same = torch.stack(ids[:docs])
    switch = torch.cat([same[:, :p], torch.stack(ids[1:])[:, p:]], 1)
    return same, switch


def capture(model, ids: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """One dense forward: the watched layer's attention output, weights and input."""
    got = {}
    attn = model.model.layers[layer].self_attn

    def hook(_m, args, kwargs, out):
        got["out"], got["probs"] = out[0].float(), out[1].float()
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).float()

    h = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return got


def run_monitor(cfg: DriftConfig, sig: dict[str, torch.Tensor], p: int) -> list[list]:
    """Feed a prefill of `p` tokens then one token at a time; per stream (sim, tau) windows
    and whether the hysteresis fired."""
    mon = make_monitor(cfg)
    b, total = sig["out"].shape[:2]

    def signal(q0: int, q1: int):
        if cfg.signal == "attn_output":
            return sig["out"][:, q0:q1]
        probs = sig["probs"][:, :, q0:q1, :q1]
        return probs if cfg.signal == "attn_probs" else (probs, sig["hidden"][:, q0:q1])

    mon.begin_trace(b)
    mon.observe(signal(0, p))
    mon.finalize_trace()
    fired = torch.zeros(b, dtype=torch.bool)
    for q in range(p, total):
        mon.observe(signal(q, q + 1))
        fired |= mon.poll()
    return [[h, bool(f)] for h, f in zip(mon.history(), fired.tolist(), strict=True)]


def summarise(same: list, switch: list) -> dict[str, float]:
    def below(rows):
        flags = [s < t for hist, _ in rows for _, s, t in hist]
        return sum(flags) / len(flags)

    def mean_sim(rows):
        sims = [s for hist, _ in rows for _, s, _ in hist]
        return sum(sims) / len(sims)

    return {
        "below_tau_no_switch": below(same),
        "below_tau_switch": below(switch),
        "fired_no_switch": sum(f for _, f in same) / len(same),
        "fired_switch": sum(f for _, f in switch) / len(switch),
        "mean_sim_no_switch": mean_sim(same),
        "mean_sim_switch": mean_sim(switch),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--continuation", type=int, default=192)
    ap.add_argument("--corpora", nargs="+", default=["wiki", "c4"])
    ap.add_argument("--layers", nargs="+", type=int, default=[-1])
    ap.add_argument("--group", type=int, default=6, help="streams per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(attn_implementation="eager")
    model.eval()
    n_layers = len(model.model.layers)
    results = []
    for corpus in args.corpora:
        same, switch = streams(tok, corpus, args.docs, args.prompt, args.continuation)
        for layer in args.layers:
            layer_abs = layer % n_layers
            rows = {name: ([], []) for name in MONITORS}
            for kind, ids in ((0, same), (1, switch)):
                for g in range(0, len(ids), args.group):
                    start = time.perf_counter()
                    sig = capture(model, ids[g : g + args.group], layer_abs)
                    for name, fields in MONITORS.items():
                        rows[name][kind].extend(
                            run_monitor(DriftConfig(**fields), sig, args.prompt)
                        )
                    print(
                        f"{corpus} layer {layer_abs} group {g}: {time.perf_counter() - start:.0f}s"
                    )
            for name, (a, b) in rows.items():
                res = {"corpus": corpus, "layer": layer_abs, "monitor": name, **summarise(a, b)}
                results.append(res)
                print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
