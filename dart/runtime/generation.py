"""Plain generation functions over HF `generate` (the controller follows through its hooks)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .runner import trim_at_eos

__all__ = ["GenerationResult", "encode_prompts", "generate"]


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: list[list[int]]
    prompt_tokens: int
    seconds: float  # prefill + decode wall time
    prefill_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: generated tokens (after the first) per decode second."""
        decode = self.seconds - self.prefill_seconds
        generated = sum(max(len(t) - 1, 0) for t in self.new_tokens)
        return generated / decode if decode > 0 else float("nan")


class _Progress(StoppingCriteria):
    """Never stops generation: advances a progress bar and times the prefill."""

    def __init__(self, bar: tqdm | None):
        self.bar = bar
        self.first_token_at: float | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True) -> dict[str, torch.Tensor]:
    """Tokenise a batch (left padded); with `chat` the tokenizer's chat template is applied."""
    if chat and getattr(tokenizer, "chat_template", None):
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return tokenizer(prompts, return_tensors="pt", padding=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    chat: bool = True,
    progress: str | None = None,
    **generate_kwargs,
) -> GenerationResult:
    """Generate for a batch of prompts; `progress` is a bar label (None: no bar)."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in encode_prompts(tokenizer, prompts, chat).items()}
    bar = tqdm(total=max_new_tokens, desc=progress, leave=False) if progress else None
    timer = _Progress(bar)
    start = time.perf_counter()
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=tokenizer.pad_token_id,
        stopping_criteria=StoppingCriteriaList([timer]),
        **generate_kwargs,
    )
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    prompt_len = enc["input_ids"].shape[1]
    new = out[:, prompt_len:]
    new_tokens = [trim_at_eos(row, tokenizer.eos_token_id) for row in new.tolist()]
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
    prefill = (timer.first_token_at or time.perf_counter()) - start
    return GenerationResult(texts, new_tokens, int(enc["attention_mask"].sum()), seconds, prefill)
