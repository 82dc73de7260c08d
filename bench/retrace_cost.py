"""Wall time of one drift event, per re-trace mode, measured side by side in one process.

After a 128-token prompt (eval-split Wikipedia), each arm decodes teacher-forced through HF's
DynamicCache in blocks of `2 w` tokens (w = the drift window, so each block holds two drift
polls). In an *event* block the drift monitor's first poll fires (stubbed, so every arm fires at
the same step), in a *quiet* block nothing fires (also stubbed); blocks alternate and arms
interleave round by round, so the load of a shared machine hits every arm alike. Per arm: the
median quiet block per token over `nodrift`'s (the per-token cost of the monitor and, for
`ffn_inputs`, of writing the input ring), and the median event block minus the median quiet
block (the event's own cost: the look-back's re-trace forward, or the `ffn_inputs` rebuild),
in decode steps of `nodrift`. With re-traces per 200 tokens from `bench/retrace.py`, the event
overhead on the decode wall time is `events/200 * event_steps / 200`.

    python bench/retrace_cost.py --rounds 6 --out results/retrace_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from dart.assets.models import load_model
from dart.evaluate.arms import Arm, arm_config, attach_arm
from dart.evaluate.stream import stream_items

ARMS = {
    "nodrift": ("dart-nodrift", {}),
    "lookback-R64": ("dart", {"drift": {"retrace": "lookback", "retrace_tokens": 64}}),
    "ffn-R8": ("dart", {"drift": {"retrace": "ffn_inputs", "retrace_tokens": 8}}),
    "ffn-R16": ("dart", {"drift": {"retrace": "ffn_inputs", "retrace_tokens": 16}}),
    "ffn-R64": ("dart", {"drift": {"retrace": "ffn_inputs", "retrace_tokens": 64}}),
}


class _Arm:
    """One attached arm with its own cache, fed the stream token by token."""

    def __init__(self, model, name: str, prune: float, prompt: list[int], stream: list[int]):
        method, overrides = ARMS[name]
        self.model, self.stream, self.pos = model, stream, 0
        self.config = arm_config(Arm(method, prune), overrides)
        self.prompt = prompt
        self.fire = False

    def _poll(self) -> torch.Tensor:
        out = torch.tensor([self.fire])
        self.fire = False  # the first poll of an event block fires, the second does not
        return out

    def block(self, steps: int, fire: bool) -> float:
        handle = attach_arm(self.model, self.config)
        try:
            c = handle.controller
            if c.monitor is not None:
                c.monitor.poll = self._poll
            with torch.no_grad():
                cache = DynamicCache()
                self.model(input_ids=torch.tensor([self.prompt]), past_key_values=cache)
                # up to the first poll of the block: the block starts right after a poll
                while (c.step + 1) % c.config.drift.window:
                    self._feed(cache)
                self._feed(cache)
                self.fire = fire
                start = time.perf_counter()
                for _ in range(steps):
                    self._feed(cache)
                return time.perf_counter() - start
        finally:
            handle.detach()

    def _feed(self, cache) -> None:
        x = torch.tensor([[self.stream[self.pos % len(self.stream)]]])
        self.pos += 1
        self.model(input_ids=x, past_key_values=cache, use_cache=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prune", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    item = stream_items(tok, 128, 96, 1, corpus="wiki", split="eval", switch_corpus="wiki")[0]
    window = 5  # DriftConfig().window
    steps = 2 * window
    arms = {n: _Arm(model, n, args.prune, item["prompt"], item["continuation"]) for n in ARMS}
    times: dict[str, dict[str, list[float]]] = {n: {"quiet": [], "event": []} for n in ARMS}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for fire in (False, True):
            for name, arm in arms.items():
                if fire and name == "nodrift":
                    continue
                times[name]["event" if fire else "quiet"].append(arm.block(steps, fire))
        print(f"round {r + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
    load.append(os.getloadavg()[0])
    base = statistics.median(times["nodrift"]["quiet"]) / steps
    out = {"load_average_start_end": load, "steps_per_block": steps, "nodrift_step_s": base}
    for name, t in times.items():
        quiet = statistics.median(t["quiet"])
        row = {"quiet_step_over_nodrift": quiet / steps / base}
        if t["event"]:
            row["event_in_nodrift_steps"] = (statistics.median(t["event"]) - quiet) / base
        out[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()})
    Path(args.out).write_text(json.dumps({"raw": times, **out}, indent=1))


if __name__ == "__main__":
    main()
