"""A lean generation loop in the style of gpt-fast: static KV cache, compiled per-token step.

Only the single-token decode step is compiled (`torch.compile(fullgraph=True)`, fixed shapes).
The prompt's pass runs eagerly; DART's look-back re-trace (`DriftConfig.retrace_tokens` R) runs
as a second compiled graph over R tokens: the static cache's write position is moved back by
R - 1 (a tensor, so the positions are data, not guards) and the pass rewrites those slots, traces
the tokens and updates the accumulators in place. Re-selections write the kept-neuron indices in
place, so the compiled steps see new masks without recompiling. The next token is chosen inside the
compiled step (argmax, or gpt-fast's exponential-race sampling), so a step returns `[B]` ids
rather than `[B, V]` logits. The controller's schedule runs on the host between steps; the drift
monitor is polled once per window, and the loop looks for EOS only then, so the hot path has no
per-token host sync.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from transformers import StaticCache

from ..core.api import DARTHandle
from ..core.ffn import TRACE
from ..core.retrace import restore_rows, rewind, save_rows

__all__ = ["FastGenerator", "FastResult", "next_token", "static_cache_logits"]

# Every generator compiles the same code object (`_decode_step`), guarded on its model: while a
# generator runs, leave room for several (models, dtypes, backends, greedy/sampled) in a process.
_RECOMPILE_LIMIT = 64

_CPP_WRAPPER = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}


@dataclass
class FastResult:
    tokens: torch.Tensor  # [B, new] generated ids (after EOS: eos repeated)
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    trace_steps: int = 0  # decode steps that ran dense and traced (DART re-trace windows)
    trace_seconds: float = 0.0  # their wall time, part of decode_seconds
    stats: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens.shape[0] * self.decode_steps / self.decode_seconds


def static_cache_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache_position: torch.Tensor,
    cache,
) -> torch.Tensor:
    """One forward over a static KV cache (written in place): the last position's logits,
    `[B, V]` fp32."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache_position=cache_position,
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1, :].float()


def next_token(
    logits: torch.Tensor, noise: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """`[B]` ids: greedy without `noise`; with `noise` (`Exp(1)` samples shaped like `logits`)
    a sample of `softmax(logits / temperature)`. `argmax(p / q)` with exponential `q` draws
    from `p` without `torch.multinomial`'s host sync (gpt-fast's `multinomial_sample_one_no_sync`);
    the noise is drawn outside so that a `torch.Generator` seeds it and the step stays one graph."""
    if noise is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return (probs / noise).argmax(-1)


class FastGenerator:
    """Greedy or sampled generation with a static cache and a compiled decode step.

    `handle` is the DART handle attached to `model` (None: plain dense model). The same object
    can generate many times (the cache is reused; shapes stay fixed per `batch_size`).

    On CPU the step is compiled with inductor's C++ wrapper (`cpp_wrapper`, None = on for CPU):
    it drops about 5 ms per token of Python wrapper work on SmolLM2 (hundreds of size asserts
    and tensor reinterprets per step). The wrapper's entry is built apart from its kernels
    (`cpp_wrapper_build_separate`), which halves the first compile (about 4.5 -> 2 minutes for
    SmolLM2 on 2 cores) at no measured cost per token. On CUDA the step is captured
    in CUDA graphs (`mode="reduce-overhead"`, `cuda_graphs`, None = on for CUDA); selection
    buffers and the cache are updated in place, so their addresses stay fixed across replays.

    DART's look-back re-trace passes (R tokens: R - 1 earlier slots rewritten and the new
    token, see `dart.core.controller`) run as their own compiled graph (`retrace_fn`, with
    `compile_trace`): one graph of fixed shape [B, R] whose positions come from the cache's
    write-position tensor, so no event recompiles it. A re-trace with fewer than R tokens so
    far (early in a short sequence) runs eagerly. Single-token trace passes (a masking step
    above 1, or `retrace_tokens=0`) go through the compiled decode step, which dynamo
    compiles once more for them. Trace passes that also collect the `auto` budget's
    sensitivity run eagerly (they happen only before a sequence's first selection).

    The loop drives the handle's controller explicitly only while `generate` runs (its hooks
    stay inert then); outside, the handle follows HF forwards as before, so `model.generate`
    and this loop can take turns on one handle.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        handle: DARTHandle | None = None,
        max_len: int = 1024,
        compile: bool = True,
        cpp_wrapper: bool | None = None,
        cuda_graphs: bool | None = None,
        compile_trace: bool = True,
    ):
        if handle is not None and handle.config.telemetry_every:
            raise ValueError(
                "DARTConfig.telemetry_every measures masks with dense FFN passes and host reads; "
                "the compiled loop runs without them: attach with telemetry_every=0 here, or "
                "measure with HF generate"
            )
        if handle is not None and handle.model is not model:
            raise ValueError(
                "FastGenerator: the handle is attached to another model than `model`; pass "
                "the handle that dart.attach(model) returned"
            )
        self.model = model
        self.handle = handle
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._caches: dict[int, StaticCache] = {}
        on_cuda = self.device.type == "cuda"
        cpp_wrapper = not on_cuda if cpp_wrapper is None else cpp_wrapper
        cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        # Positions of every decode step, sliced per step instead of allocated per step.
        self._positions = torch.arange(max_len, device=self.device)
        self.step_fn = self._decode_step
        self.retrace_fn = self._retrace_step
        self.compile_trace = compile_trace
        if compile:
            options = dict(
                fullgraph=True,
                dynamic=False,
                mode="reduce-overhead" if cuda_graphs else None,
                options=_CPP_WRAPPER if cpp_wrapper else None,
            )
            self.step_fn = torch.compile(self._decode_step, **options)
            if compile_trace:
                self.retrace_fn = torch.compile(self._retrace_step, **options)

    @property
    def trace_fn(self):
        """The step of re-trace passes: the compiled step (its second graph) or eager."""
        return self.step_fn if self.compile_trace else self._decode_step

    def _cache(self, batch: int) -> StaticCache:
        if batch not in self._caches:
            self._caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        cache = self._caches[batch]
        cache.reset()
        return cache

    def cache_tensors(self) -> list[torch.Tensor]:
        """The static KV caches' tensors (one cache per batch size generated so far)."""
        return [
            t
            for cache in self._caches.values()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
            if t is not None
        ]

    def _decode_step(
        self, ids, position_ids, cache_position, attention_mask, cache, noise, temperature
    ) -> torch.Tensor:
        logits = static_cache_logits(
            self.model, ids, attention_mask, position_ids, cache_position, cache
        )
        return next_token(logits, noise, temperature)

    def _retrace_step(self, *args) -> torch.Tensor:
        """`_decode_step` over the R tokens of a re-trace: a code object of its own, so dynamo
        keeps its [B, R] graph apart from the [B, 1] step's (inlined, no recompiles)."""
        return self._decode_step(*args)

    def _retrace(self, c, seq_ids, slot, full_mask, positions, cache, noise, temperature):
        """The look-back re-trace pass at cache `slot` (the new token's): the rows whose drift
        fired recompute the last R - 1 slots densely with it; the other rows' keys and values
        there are put back afterwards (their new token, in this one pass, attends to their own
        recompute under their masks, see `DARTHandle._retrace`)."""
        fired = c.retrace_rows
        prior = c.retrace_span(slot, 1)
        span = slice(slot - prior, slot + 1)
        c.begin_retrace(prior, 1, full_mask[:, span].bool())
        others = [b for b in range(full_mask.shape[0]) if b not in fired]
        keep = torch.tensor(others, dtype=torch.long, device=self.device)
        saved = save_rows(cache, keep, prior) if others else None
        rewind(cache, prior)
        full = prior + 1 == c.retrace_tokens and not c.needs_sensitivity
        step = self.retrace_fn if full else self._retrace_step
        ids = seq_ids[:, span].contiguous()  # fixed strides: one compiled graph
        token = step(
            ids, positions[:, span], self._positions[span], full_mask, cache, noise, temperature
        )
        if saved is not None:
            restore_rows(cache, keep, saved, 1)
        return token

    def _tracing(self) -> bool:
        return self.handle is not None and any(f.mode == TRACE for f in self.handle.ffns)

    @contextmanager
    def _driving(self):
        """While the loop runs: the controller is stepped by the loop, not by its hooks, and
        dynamo may keep more compiled variants of the step; both restored on exit."""
        c = self.handle.controller if self.handle is not None else None
        limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        with ExitStack() as stack:
            if c is not None:
                stack.enter_context(c.driven())
            stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit))
            yield c

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> FastResult:
        """Generate for a left-padded batch; tokens equal HF greedy `generate` for greedy."""
        batch, prompt_len = input_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if self.handle is not None and getattr(self.model, "_dart_handle", None) is not self.handle:
            # the patched modules are gone: running would be dense under the stale stats
            raise RuntimeError(
                "FastGenerator: its DART handle was detached from the model; attach again and "
                "make a new FastGenerator with the new handle (or pass handle=None for dense)"
            )
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds max_len "
                f"({self.max_len}) of this FastGenerator"
            )
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        with self._driving() as c:
            return self._generate(
                c,
                input_ids,
                attention_mask,
                max_new_tokens,
                do_sample,
                temperature,
                eos_token_id,
                generator,
            )

    def _generate(
        self, c, input_ids, attention_mask, max_new_tokens, do_sample, temperature, eos, generator
    ) -> FastResult:
        batch, prompt_len = input_ids.shape
        cache = self._cache(batch)
        # Full-length 2-D mask (fixed shape for the compiled step): future slots are 1, the
        # causal mask hides them; left padding stays 0.
        full_mask = torch.ones(batch, self.max_len, dtype=attention_mask.dtype, device=self.device)
        full_mask[:, :prompt_len] = attention_mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

        start = time.perf_counter()
        if c is not None:
            c.begin(batch, self.device)
            c.before_forward(attention_mask.bool())
        logits = static_cache_logits(
            self.model,
            input_ids,
            full_mask[:, :prompt_len],
            positions,
            self._positions[:prompt_len],
            cache,
        )
        if c is not None:
            c.after_forward()
        vocab = logits.shape[-1]

        def noise():
            if not do_sample:
                return None
            q = torch.empty(batch, vocab, device=self.device)
            return q.exponential_(generator=generator)

        next_pos = positions[:, -1:] + 1
        slot_positions = (full_mask.long().cumsum(-1) - 1).clamp_min(0)  # of every cache slot
        out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=self.device)
        token = next_token(logits, noise(), temperature)
        out[:, 0] = token
        prefill = time.perf_counter() - start
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        if eos is not None:
            done |= token == eos  # the prompt pass's token may already end a row
            if c is not None:
                c.finish_rows(done)
        window = c.config.drift.window if c is not None else 16
        start = time.perf_counter()
        steps = trace_steps = 0
        trace_seconds = 0.0
        for t in range(1, max_new_tokens):
            cache_position = self._positions[prompt_len + t - 1 : prompt_len + t]
            step_args = (token[:, None], next_pos, cache_position, full_mask, cache)
            step_args += (noise(), temperature)
            if c is not None:
                c.before_forward(None)
            if c is not None and c.retrace_rows:
                trace_start = time.perf_counter()
                seq_ids = torch.cat([input_ids, out[:, :t]], 1)  # slot j holds token j
                slot = prompt_len + t - 1
                token = self._retrace(c, seq_ids, slot, full_mask, slot_positions, *step_args[4:])
                c.after_forward()
                trace_seconds += time.perf_counter() - trace_start
                trace_steps += 1
            elif self._tracing():
                trace_start = time.perf_counter()
                step = self._decode_step if c.needs_sensitivity else self.trace_fn
                token = step(*step_args)
                c.after_forward()
                trace_seconds += time.perf_counter() - trace_start
                trace_steps += 1
            else:
                token = self.step_fn(*step_args)
                if c is not None:
                    c.after_forward()
            # a copy: with CUDA graphs the step's output buffer is overwritten by the next replay
            token = token.clone()
            if eos is not None:
                token = torch.where(done, eos, token)
                done |= token == eos
                if c is not None:  # a row past its EOS no longer traces or drives re-traces
                    c.finish_rows(done)
            out[:, t] = token
            next_pos = next_pos + 1
            steps += 1
            if eos is not None and t % window == 0 and bool(done.all()):
                out[:, t + 1 :] = eos
                break
        decode = time.perf_counter() - start
        stats = self.handle.stats() if self.handle is not None else {}
        return FastResult(out, prefill, decode, steps, trace_steps, trace_seconds, stats)
