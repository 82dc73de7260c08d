"""End-to-end decode speed, side by side in one process.

Arms (same prompts, same number of new tokens):
  hf_dense                HF `generate`, dense model (eager)
  hf_static_compiled      HF `generate` with a static cache and torch.compile, dense model
                          (the baseline a user would pick; every ratio is also given against it)
  dense_compiled          the compiled static-cache loop (dart.runtime.fast), dense model
  dart_masked             HF `generate` with DART's masked backend (the paper's simulation)
  dart_gathered_compiled  the compiled loop with DART's gathered kernels
  dart_compact_compiled   the compiled loop with DART's compact (slice-on-reselect) buffers
  pertoken_<mode>[_compiled]
                          a per-token method (gate, gate-weighted, input; opt-in, e.g.
                          `--arms dense_compiled,pertoken_input_compiled`) on the gathered
                          backend, whose CPU steps run the fused per-token kernels; thresholds
                          calibrated on the bench prompts at the setting's sparsity (the share of
                          FFN bytes left unread; a sparsity the mode cannot reach skips the arm,
                          noted on stderr); `rd` is the share it really read per token and
                          `FFN MB/tok` those bytes (in the weights' own format: q4's 18 bytes per
                          32 values); `--dart.batch_policy shared` runs the union policy at batch
                          > 1. On quantised weights (`--dtypes q4`) the gate modes run the fused
                          quantised kernel; the input mode cannot (skipped, noted on stderr)
  llamacpp                llama.cpp's `llama-bench` on the packaged model's own GGUF file (opt-in:
                          `--arms llamacpp,...`; batch 1, CPU, same threads, `-p 0 -n new_tokens`;
                          built once from the pinned source by `dart.llamacpp`, see `make
                          llamacpp`). Its weights are the quantised file, whatever `--dtypes` says;
                          with it the table gains a `vs llama.cpp` column. Its worker threads
                          spin-wait, so time it on a quiet machine.

Rounds interleave the arms (each round runs every arm once) and the table reports medians, so
a noisy shared machine hits all arms alike. Round 0 warms up (compiles); a measured run during
which dynamo compiled a graph (one the warm-up did not meet, e.g. a re-trace's) is not counted
and runs again (column `compiled`: graphs compiled in the counted runs, 0 when clean). The
ideal speedup is the ratio of weight bytes read per token, dense over pruned (FFN rows skipped,
everything else read in full).

Every tok/s figure is decode only (the tokens after the first over the time after the prefill's
token; HF `generate` arms are clocked by a stopping criterion that never stops). Per arm the
table also gives the prefill time, the memory the arm holds (weights, DART's extra
state, and the static KV cache of the compiled loop; on CUDA the allocator's peak instead),
and DART's re-selection cost: `sel ms` is one mask build (scoring, top-k and re-slicing of all
layers), `sel/tok` that cost amortised over the generated tokens at the measured re-trace
frequency, and `trace/tok` the extra time of the dense re-trace steps over sparse steps,
per generated token.

    python bench/decode.py --quick            # < 5 minutes on 2 CPU cores
    python bench/decode.py --dtypes float32,bfloat16 --sparsity 0.5,0.7 --json out.json
    python bench/decode.py --model qwen2.5-coder-1.5b --dtypes fp32 --batch 1,4 --new-tokens 32
    python bench/decode.py --model qwen2.5-coder-1.5b --dtypes fp32 --threads 2 \
        --arms llamacpp,hf_static_compiled,dense_compiled,dart_gathered_compiled
    python bench/decode.py --dtypes bf16,q8,q4 --new-tokens 32   # quantised weights (q8, q4)
    python bench/decode.py --batch 4 --dart.batch_policy shared --dart.layer_topk all:auto

DART's settings are the `--dart.*` flags every `dart` command takes (`--help` lists them); the
bench sets the method, the backend (per arm) and total_prune (`--sparsity`) itself.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dart  # noqa: E402
from dart.assets.data import load_drift_prompts  # noqa: E402
from dart.core.config import ConfigError  # noqa: E402
from dart.core.per_token import PER_TOKEN_MODES  # noqa: E402
from dart.llamacpp import bench as llamacpp_bench  # noqa: E402
from dart.llamacpp import ensure_llamacpp, packaged_gguf  # noqa: E402
from dart.options import add_dart_flags, dart_config_from  # noqa: E402
from dart.results import write_json  # noqa: E402
from dart.runtime.fast import FastGenerator  # noqa: E402
from dart.runtime.generation import encode_prompts  # noqa: E402

ARMS = (
    "hf_dense",
    "hf_static_compiled",
    "dense_compiled",
    "dart_masked",
    "dart_gathered_compiled",
    "dart_compact_compiled",
)


# Randomly initialised Llama models of real shapes (GPU figures; the packaged model does not
# travel): hidden, intermediate, layers, heads, kv heads, vocab.
RANDOM_SHAPES = {
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (64, 256, 2, 4, 2, 512),  # smoke tests
}
RANDOM_PROMPT_LEN = 64
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16}  # fmt: skip
# Quantised settings (`dart.quantize`: FFNs, attention and head read q8/q4/q4m rows; activations
# and embeddings in fp32); the compact arm copies the kept quantised rows.
QUANT = {"q8": "q8", "q4": "q4", "q4m": "q4m"}
DENSE_ARMS = ("hf_dense", "hf_static_compiled", "dense_compiled")
# Opt-in per-token arms: pertoken_<mode> (HF generate) and pertoken_<mode>_compiled
PER_TOKEN_ARMS = tuple(
    f"pertoken_{m}{s}" for m in ("gate", "gate-weighted", "input") for s in ("", "_compiled")
)
LLAMACPP = "llamacpp"  # opt-in: needs a packaged GGUF and builds llama.cpp on first use
BASELINE_ARMS = (*DENSE_ARMS, LLAMACPP)  # measured once per dtype and batch, not per sparsity
SPIN_NOTE = (
    "llama.cpp's worker threads spin-wait (busy-poll) between operations: its tok/s holds only "
    "on a quiet machine (load average at the end: {load})"
)


def load_bench_model(name: str, dtype: torch.dtype, device: str, weights: str = "fp"):
    """`(model, tokenizer)`: a `dart.load_model` name, or `random:<shape>` (tokenizer None);
    `weights` "fp" or a `dart.quantize` format."""
    if not name.startswith("random:"):
        model, tok = dart.load_model(name, dtype=dtype, weights=weights)
        if weights != "fp":
            load = model.dart_load
            print(
                f"loaded {name} as {weights} in {load['seconds']:.1f} s (direct GGUF read: "
                f"{load['direct']}), peak RSS {load['peak_rss_bytes'] / 2**30:.2f} GiB",
                file=sys.stderr,
            )
        return model.to(device), tok
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = name.split(":", 1)[1]
    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"--model {name}: shapes are {', '.join(RANDOM_SHAPES)}")
    d, n, layers, heads, kv, vocab = RANDOM_SHAPES[shape]
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=n,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    if weights != "fp":
        dart.quantize(model, weights)
    return model.eval(), None


def bench_prompts(tok, batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, attention mask, pad id): packaged two-topic prompts, or seeded random ids."""
    if tok is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (batch, RANDOM_PROMPT_LEN), generator=g)
        return ids, torch.ones_like(ids), 0
    prompts = [p.prompt for p in load_drift_prompts("two_topic")[:batch]]
    if len(prompts) < batch:
        raise SystemExit(f"--batch {batch}: only {len(prompts)} packaged prompts")
    enc = encode_prompts(tok, prompts)
    return enc["input_ids"], enc["attention_mask"], tok.pad_token_id


def weight_bytes_per_token(model, keep_fraction: float) -> tuple[float, float]:
    """(dense, pruned) bytes of weights read to decode one token (embedding row ignored)."""
    handle = dart.attach(model, dart.DARTConfig(method="dense"))
    ffn = sum(sum(t.numel() * t.element_size() for t in _ffn_tensors(f)) for f in handle.ffns)
    handle.detach()
    emb = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)  # None: quantised head
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if head is not None and head.data_ptr() == emb.data_ptr():  # tied: the embedding is the head
        dense = total
    else:
        dense = total - emb.numel() * emb.element_size()
    return dense, dense - ffn * (1.0 - keep_fraction)


def _ffn_tensors(ffn):
    p = ffn.parts
    if p.quant is not None:  # quantised rows: data, scales (and mins) of gate, up and down
        q = p.quant
        return [t for m in (q.gate_proj, q.up_proj, q.down_proj) for t in m.rows().tensors()]
    return [t for t in (p.w_gate, p.w_up, p.w_down_t) if t is not None]


def _config(args, sparsity: float, backend: str) -> dart.DARTConfig:
    """The DARTConfig of a DART arm: the `--dart.*` settings, the setting's sparsity and the
    arm's backend."""
    return dart_config_from(vars(args), total_prune=sparsity, backend=backend)


class _TokenClock(StoppingCriteria):
    """Never stops generation; remembers when the first new token was ready."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Arm:
    """One arm: its own copy of the model (DART patches a model in place), set up once."""

    def __init__(self, name: str, base, args, sparsity: float, max_len: int, calib_ids=None):
        self.name = name
        self.model = base if name in DENSE_ARMS else copy.deepcopy(base)
        self.handle = None
        self.ffn_bytes = None  # dense FFN bytes per token, where the bytes meter reads them
        if name.startswith("dart_"):
            backend = name.split("_")[1]
            self.handle = dart.attach(self.model, _config(args, sparsity, backend))
        elif name.startswith("pertoken_"):
            self.handle = dart.attach(self.model, _per_token_config(name, args, sparsity))
            self.handle.calibrate(calib_ids)
            # the bytes meter's dense FFN bytes per token (the weights' own format)
            self.ffn_bytes = sum(f.dense_entries * f.entry_bytes for f in self.handle.ffns)
        self.fast = None
        if name.endswith("_compiled"):
            self.fast = FastGenerator(self.model, self.handle, max_len)

    def run(self, ids, mask, new_tokens: int, pad_id: int) -> dict:
        if self.handle is not None:
            self.handle.reset()
        cuda = ids.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(ids.device)
        if self.fast is not None:
            r = self.fast.generate(ids, mask, max_new_tokens=new_tokens)
            rec = {"tokens_per_s": r.tokens_per_s, "prefill_seconds": r.prefill_seconds}
            sparse_steps = r.decode_steps - r.trace_steps
            if r.trace_steps and sparse_steps:
                # extra time of the dense re-trace steps over sparse ones
                sparse_s = (r.decode_seconds - r.trace_seconds) / sparse_steps
                extra = r.trace_seconds - r.trace_steps * sparse_s
                rec["trace_ms_per_token"] = 1000.0 * max(extra, 0.0) / (r.decode_steps + 1)
        else:
            clock = _TokenClock()
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([clock]),
                **self.generate_kwargs(),
            )
            end = time.perf_counter()
            # Decode only, like the compiled loop's figure: the prefill (and its first token)
            # ends at the clock's first tick.
            decoded = out.shape[1] - ids.shape[1] - 1
            rec = {
                "tokens_per_s": ids.shape[0] * decoded / (end - clock.first),
                "prefill_seconds": clock.first - start,
            }
        rec["memory_mb"] = (
            torch.cuda.max_memory_allocated(ids.device) if cuda else self.resident_bytes()
        ) / 2**20
        if self.handle is not None:
            stats = self.handle.stats()
            rec["effective_sparsity"] = stats["effective_sparsity"]
            if "ffn_bytes_read_fraction" in stats:  # per-token methods: measured per token
                rec["ffn_bytes_read_fraction"] = stats["ffn_bytes_read_fraction"]
                if self.ffn_bytes is not None:
                    rec["ffn_mb_read_per_token"] = (
                        stats["ffn_bytes_read_fraction"] * self.ffn_bytes / 2**20
                    )
            if "dense_token_computations_per_token" in stats:
                rec["dense_token_computations_per_token"] = stats[
                    "dense_token_computations_per_token"
                ]
            rec["retraces"] = stats["mask_refreshes"]
            builds = stats["mask_builds"] / ids.shape[0]  # per-sequence builds of all layers
            rec["selection_ms"] = 1000.0 * stats["selection_seconds"] / max(builds, 1)
            rec["selection_ms_per_token"] = 1000.0 * stats["selection_seconds"] / new_tokens
        return rec

    def generate_kwargs(self) -> dict:
        """HF `generate` options of the arm: the static-cache arm compiles its forward (on
        every device: HF compiles automatically only on accelerators)."""
        if self.name != "hf_static_compiled":
            return {}
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # HF's switch for CPU compilation
        return {"cache_implementation": "static", "compile_config": compile_config}

    def resident_bytes(self) -> int:
        """Weights and buffers (unique storages), DART's extra state and the static KV cache."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if self.fast is not None:
            tensors += self.fast.cache_tensors()
        seen: dict[int, int] = {}
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        extra = self.handle.stats()["extra_state_bytes_total"] if self.handle is not None else 0
        return sum(seen.values()) + extra

    def close(self) -> None:
        if self.handle is not None:
            self.handle.detach()


class LlamaCppArm:
    """llama.cpp on the packaged GGUF: one `llama-bench -p 0 -n new_tokens` per run, with the
    same thread count as the torch arms. One repetition per run (after llama-bench's own
    warm-up run), so rounds interleave it with the other arms like any arm."""

    name = LLAMACPP

    def __init__(self, gguf: Path, tools: Path, threads: int):
        self.gguf, self.tools, self.threads = gguf, tools, threads

    def run(self, ids, mask, new_tokens: int, pad_id: int) -> dict:
        if ids.shape[0] != 1:
            raise ValueError(f"the {LLAMACPP} arm decodes one sequence, got batch {ids.shape[0]}")
        (rec,) = llamacpp_bench(
            self.gguf, self.threads, new_tokens, n_prompt=0, repetitions=1, tools=self.tools
        )
        return {
            "tokens_per_s": rec.avg_ts,
            "memory_mb": rec.model_size / 2**20,  # the weights (llama-bench's model size)
            "llamacpp_model_type": rec.model_type,
            "threads": rec.n_threads,
        }

    def close(self) -> None:
        pass


def _per_token_config(name: str, args, sparsity: float) -> dart.DARTConfig:
    """A per-token arm's config: its mode, the setting's sparsity, the gathered (fused) kernels
    and the bench's batch policy (``shared``: the union policy)."""
    mode = name.removeprefix("pertoken_").removesuffix("_compiled")
    return dart.DARTConfig(
        method=mode, total_prune=sparsity, backend="gathered", batch_policy=args.batch_policy
    )


def _runnable(name: str, args, sparsity: float, weights: str) -> bool:
    """Whether an arm runs in this setting; a per-token mode that cannot (a sparsity out of its
    reach, the input mode on quantised weights) is skipped with the reason on stderr."""
    if not name.startswith("pertoken_"):
        return True
    mode = name.removeprefix("pertoken_").removesuffix("_compiled")
    if weights != "fp" and not PER_TOKEN_MODES[mode].quantised:
        print(f"  {name}: skipped on {weights} weights (a quantised block cannot skip single "
              "input entries)", file=sys.stderr)  # fmt: skip
        return False
    try:
        _per_token_config(name, args, sparsity)
    except ConfigError as err:
        print(f"  {name}: skipped at sparsity {sparsity} ({err})", file=sys.stderr)
        return False
    return True


def make_arm(name: str, base, args, sparsity: float, max_len: int, calib_ids=None):
    if name == LLAMACPP:
        return LlamaCppArm(args.llamacpp_gguf, args.llamacpp_tools, args.llamacpp_threads)
    return Arm(name, base, args, sparsity, max_len, calib_ids)


# A measured run that compiled (a graph first met after the warm-up round, e.g. a re-trace's) is
# discarded and run again, at most this many times; then it is kept and flagged.
MAX_COMPILING_RUNS = 3


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def measure(arm: Arm, ids, mask, new_tokens: int, pad_id: int) -> dict:
    """One measured run of ``arm`` during which nothing was compiled (see MAX_COMPILING_RUNS;
    a run that still compiled has ``compiled_graphs`` > 0)."""
    for attempt in range(1, MAX_COMPILING_RUNS + 1):
        before = compiled_graphs()
        rec = arm.run(ids, mask, new_tokens, pad_id)
        rec["compiled_graphs"] = compiled_graphs() - before
        if not rec["compiled_graphs"]:
            return rec
        print(
            f"  {arm.name}: {rec['compiled_graphs']} graph(s) compiled during measured run "
            f"{attempt} of at most {MAX_COMPILING_RUNS}; not counted",
            file=sys.stderr,
        )
    return rec


def bench_setting(base, tok, dtype, batch, sparsity, args, with_dense: bool) -> list[dict]:
    ids, mask, pad_id = bench_prompts(tok, batch, base.config.vocab_size)
    device = next(base.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    max_len = ids.shape[1] + args.new_tokens + 8
    weights = dtype if isinstance(dtype, str) else "fp"  # quantised: the format's name
    names = [a for a in args.arms if with_dense or a not in BASELINE_ARMS]
    names = [a for a in names if _runnable(a, args, sparsity, weights)]
    if LLAMACPP in names and batch != 1:
        print(f"  {LLAMACPP}: skipped at batch {batch} (it decodes one sequence)", file=sys.stderr)
        names.remove(LLAMACPP)
    if "dense_compiled" not in names:
        names.append("dense_compiled")  # the baseline of every ratio
    torch._dynamo.reset()  # each setting compiles its own steps
    calib = ids[:1, mask[0].bool()]  # per-token thresholds: the first prompt, unpadded
    arms = [make_arm(n, base, args, sparsity, max_len, calib) for n in names]
    samples: dict[str, list[dict]] = {a.name: [] for a in arms}
    for rnd in range(args.rounds + 1):  # round 0 warms up (compiles)
        for arm in arms:
            if rnd == 0:
                rec = arm.run(ids, mask, args.new_tokens, pad_id)
            else:
                rec = measure(arm, ids, mask, args.new_tokens, pad_id)
                samples[arm.name].append(rec)
            print(f"  round {rnd} {arm.name:<24} {rec['tokens_per_s']:7.1f} tok/s", file=sys.stderr)
    for arm in arms:
        arm.close()
    base_tps = statistics.median(s["tokens_per_s"] for s in samples["dense_compiled"])
    dense_b, pruned_b = weight_bytes_per_token(base, 1.0 - sparsity)
    out = []
    for name in names:
        tps = statistics.median(s["tokens_per_s"] for s in samples[name])
        dense_arm = name in BASELINE_ARMS
        rec = {
            "arm": name,
            "dtype": str(dtype).replace("torch.", ""),
            "batch": batch,
            "sparsity": 0.0 if dense_arm else sparsity,
            "tokens_per_s": tps,
            "ms_per_token": 1000.0 * batch / tps,
            "speedup_vs_dense_compiled": tps / base_tps,
            "ideal_speedup": 1.0 if name in DENSE_ARMS else dense_b / pruned_b,
            "new_tokens": args.new_tokens,
            "batch_policy": args.batch_policy,
            "setting_sparsity": sparsity,  # the setting the record was measured in
        }
        for key in (
            "prefill_seconds",
            "memory_mb",
            "effective_sparsity",
            "retraces",
            "selection_ms",
            "selection_ms_per_token",
            "trace_ms_per_token",
            "dense_token_computations_per_token",
            "ffn_bytes_read_fraction",
            "ffn_mb_read_per_token",
            "threads",
        ):
            vals = [s[key] for s in samples[name] if key in s]
            if vals:
                rec[key] = statistics.median(vals)
        if name == LLAMACPP:  # its weights are the GGUF's quantised ones, not `dtype`
            rec["llamacpp_model_type"] = samples[name][0]["llamacpp_model_type"]
            del rec["ideal_speedup"]  # bytes of another format: not the same ratio
        # every counted run that still compiled shows (a median would hide one in three)
        rec["compiled_graphs"] = sum(s["compiled_graphs"] for s in samples[name])
        if with_dense or not dense_arm or name == "dense_compiled":  # each setting's baseline
            out.append(rec)
    return out


def add_hf_ratios(records: list[dict]) -> None:
    """Every record's speedup over the HF static-cache compiled arm of its dtype and batch."""
    hf = {(r["dtype"], r["batch"]): r["tokens_per_s"] for r in records
          if r["arm"] == "hf_static_compiled"}  # fmt: skip
    for r in records:
        base = hf.get((r["dtype"], r["batch"]))
        if base:
            r["speedup_vs_hf_static_compiled"] = r["tokens_per_s"] / base


def add_llamacpp_ratios(records: list[dict]) -> None:
    """Every record's speed as a ratio to the llama.cpp arm's of its dtype and batch."""
    ref = {(r["dtype"], r["batch"]): r["tokens_per_s"] for r in records if r["arm"] == LLAMACPP}
    for r in records:
        base = ref.get((r["dtype"], r["batch"]))
        if base:
            r["speedup_vs_llamacpp"] = r["tokens_per_s"] / base


def print_table(records: list[dict]) -> None:
    cols = [
        ("dtype", 9, lambda r: r["dtype"]),
        ("batch", 6, lambda r: r["batch"]),
        ("policy", 13, lambda r: r["batch_policy"] if r["sparsity"] else "-"),
        ("arm", 25, lambda r: r["arm"]),
        ("sparsity", 9, lambda r: f"{r['sparsity']:.2f}"),
        ("tok/s", 8, lambda r: f"{r['tokens_per_s']:.1f}"),
        ("ms/tok", 8, lambda r: f"{r['ms_per_token']:.1f}"),
        ("vs dense_c.", 12, lambda r: f"{r['speedup_vs_dense_compiled']:.2f}x"),
        ("vs hf_static", 13, lambda r: _fmt(r, "speedup_vs_hf_static_compiled", 1.0, 2)),
        ("ideal", 7, lambda r: _fmt(r, "ideal_speedup", 1.0, 2, "x")),
        ("prefill ms", 11, lambda r: _fmt(r, "prefill_seconds", 1000.0)),
        ("mem MB", 8, lambda r: _fmt(r, "memory_mb", 1.0, 0)),
        ("eff.sp", 7, lambda r: _fmt(r, "effective_sparsity", 1.0, 2)),
        ("rd", 5, lambda r: _fmt(r, "ffn_bytes_read_fraction", 1.0, 2)),
        ("FFN MB/tok", 11, lambda r: _fmt(r, "ffn_mb_read_per_token", 1.0, 3)),
        ("retraces", 9, lambda r: r.get("retraces", "-")),
        ("sel ms", 7, lambda r: _fmt(r, "selection_ms", 1.0)),
        ("sel/tok", 8, lambda r: _fmt(r, "selection_ms_per_token", 1.0, 2)),
        ("trace/tok", 10, lambda r: _fmt(r, "trace_ms_per_token", 1.0, 2)),
        ("dense tok/tok", 14, lambda r: _fmt(r, "dense_token_computations_per_token", 1.0, 3)),
        ("compiled", 9, lambda r: r.get("compiled_graphs", "-")),
    ]
    if any(r["arm"] == LLAMACPP for r in records):
        cols.insert(9, ("vs llama.cpp", 13, lambda r: _fmt(r, "speedup_vs_llamacpp", 1.0, 2, "x")))
    print("\n" + "".join(f"{name:>{w}}" for name, w, _ in cols))
    for r in records:
        print("".join(f"{str(get(r)):>{w}}" for _, w, get in cols))


def _fmt(r: dict, key: str, scale: float, digits: int = 1, unit: str = "") -> str:
    return f"{r[key] * scale:.{digits}f}{unit}" if key in r else "-"


def setup_llamacpp(args) -> None:
    """Check that the llama.cpp arm can run (a packaged GGUF, CPU) and build it once; refuses
    with SystemExit before any model is loaded."""
    if args.device != "cpu":
        raise SystemExit(
            f"--arms {LLAMACPP}: llama.cpp is built for the CPU, not --device {args.device}"
        )
    try:
        args.llamacpp_gguf = packaged_gguf(args.model)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"--arms {LLAMACPP}: {err}") from err
    args.llamacpp_tools = ensure_llamacpp(progress=True)
    args.llamacpp_threads = args.threads or torch.get_num_threads()


# DARTConfig fields the bench sets itself: the arms' method and backend, the --sparsity sweep.
BENCH_OWNED = ("method", "total_prune", "backend")


def build_parser() -> argparse.ArgumentParser:
    """The bench's flags: its own sweep axes and arms, and the `--dart.*` DARTConfig settings
    every command takes (dart.options.add_dart_flags; e.g. `--dart.layer_topk`,
    `--dart.batch_policy shared`, `--dart.drift.retrace_tokens 32`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="a dart.load_model name or folder, or random:<shape> with shape in "
        + ", ".join(RANDOM_SHAPES),
    )
    p.add_argument("--dtypes", "--dtype", default="float32,bfloat16",
                   help="comma list of " + ", ".join(DTYPES) + " and the quantised weights "
                   + ", ".join(QUANT) + " (dart.quantize, fp32 activations)")  # fmt: skip
    p.add_argument("--sparsity", default="0.5,0.7")
    p.add_argument("--batch", default="1")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--arms",
        default=",".join(ARMS),
        help=f"comma list of {', '.join((*ARMS, *PER_TOKEN_ARMS, LLAMACPP))} ({LLAMACPP} and "
        "the pertoken_* arms are opt-in)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--quick",
        action="store_true",
        help="fp32, 70%% sparsity, the four main arms, 48 tokens, 2 rounds (< 5 min)",
    )
    p.add_argument("--json", default=None, help="write the records to this path")
    add_dart_flags(p, exclude=BENCH_OWNED)
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:  # a bad setting fails here, naming its flag, before any model loads
        args.batch_policy = _config(args, 0.5, "gathered").batch_policy
    except ConfigError as err:
        p.error(str(err))
    if args.quick:
        args.dtypes, args.sparsity, args.new_tokens, args.rounds = "float32", "0.7", 48, 2
        args.arms = ",".join(a for a in ARMS if a != "dart_compact_compiled")
    args.arms = args.arms.split(",")
    for arm in args.arms:
        if arm not in (*ARMS, *PER_TOKEN_ARMS, LLAMACPP):
            raise SystemExit(f"--arms {arm!r}: use {', '.join((*ARMS, *PER_TOKEN_ARMS, LLAMACPP))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if LLAMACPP in args.arms:
        setup_llamacpp(args)
    records = []
    for dtype_name in args.dtypes.split(","):
        if dtype_name not in DTYPES and dtype_name not in QUANT:
            raise SystemExit(f"--dtypes {dtype_name!r}: use {', '.join([*DTYPES, *QUANT])}")
        weights = QUANT.get(dtype_name, "fp")
        dtype = DTYPES.get(dtype_name, torch.float32)
        model, tok = load_bench_model(args.model, dtype, args.device, weights)
        if weights != "fp":
            dtype = weights  # the records' "dtype" column names the weights
        for batch in (int(b) for b in args.batch.split(",")):
            for i, sparsity in enumerate(float(s) for s in args.sparsity.split(",")):
                print(
                    f"[{dtype_name} batch {batch} {args.batch_policy} sparsity {sparsity}]",
                    file=sys.stderr,
                )
                records += bench_setting(model, tok, dtype, batch, sparsity, args, i == 0)
    add_hf_ratios(records)
    add_llamacpp_ratios(records)
    print_table(records)
    if any(r["arm"] == LLAMACPP for r in records):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print("\n" + SPIN_NOTE.format(load=load))
    if args.json:
        write_json(args.json, records)


if __name__ == "__main__":
    main()
