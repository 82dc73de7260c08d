"""Tiny randomly initialised models of every supported family, for fast model-level tests."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96


def _common(**extra):
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def tiny_config(family: str):
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        return tf.LlamaConfig(**_common(**llama_like))
    if family == "mistral":
        return tf.MistralConfig(**_common(**llama_like))
    if family == "qwen2":
        return tf.Qwen2Config(**_common(**llama_like))
    if family == "qwen3":
        return tf.Qwen3Config(**_common(head_dim=8, **llama_like))
    if family == "gemma":
        return tf.GemmaConfig(**_common(head_dim=8, hidden_act="gelu_pytorch_tanh", **llama_like))
    if family == "gemma2":
        return tf.Gemma2Config(**_common(head_dim=8, **llama_like))
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**_common(head_dim=8, sliding_window=16, **llama_like))
    if family == "phi3":
        return tf.Phi3Config(**_common(**llama_like))
    if family == "gpt2":
        return tf.GPT2Config(**_common(n_embd=32, n_layer=3, n_head=4, n_positions=128))
    two_matrix = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128
    )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**_common(intermediate_size=64, **two_matrix))
    if family == "opt":
        return tf.OPTConfig(**_common(ffn_dim=64, word_embed_proj_dim=32, **two_matrix))
    raise ValueError(family)


FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)


def tiny_model(
    family: str = "llama", seed: int = 0, attn: str = "eager", layers: int | None = None
) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = attn
    if layers is not None:
        config.num_hidden_layers = layers
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-zero FFN outputs; scale weights up so pruning changes logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


# ------------------------------------------------------------------------------------------
# Driving a patched model in the model-level tests

NO_DRIFT = {"enabled": False}


def random_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    """Token ids in [3, VOCAB) (clear of pad/bos/eos), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def prefill_and_step(model, ids, attention_mask=None):
    """Logits of the prompt's pass and of one greedy step through the cache."""
    out = model(ids, attention_mask=attention_mask, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)
    step = model(nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


def calibrated(model, method: str, backend: str = "masked", **cfg):
    """``model`` with a per-token ``method`` attached and calibrated on fixed random ids."""
    import dart

    handle = dart.attach(model, dart.DARTConfig(method=method, backend=backend, **cfg))
    handle.calibrate(random_ids(1, 40, seed=7))
    return handle


def prompt_step_logits(model, ids):
    """Logits of the prompt's pass and of its last two tokens fed again through its cache."""
    out = model(ids, use_cache=True)
    step = model(ids[:, -2:], past_key_values=out.past_key_values, use_cache=True)
    return out.logits, step.logits


def fast_eager_and_compiled(model, handle, ids, max_new_tokens: int = 6, max_len: int = 32):
    """FastGenerator's results without and with its compile, the handle reset before each."""
    from dart.runtime.fast import FastGenerator

    results = []
    for compile in (False, True):
        torch._dynamo.reset()
        fast = FastGenerator(model, handle, max_len=max_len, compile=compile)
        handle.reset()
        results.append(fast.generate(ids, max_new_tokens=max_new_tokens))
    return results


def drive(model, handle, ids, steps: int):
    """Prefill, then `steps` greedy single-token passes; the phases after each pass."""
    out = model(ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    phases = [list(handle.controller.phase)]
    for _ in range(steps):
        out = model(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        phases.append(list(handle.controller.phase))
    return phases


def force_drift(controller, at: dict[int, list[int]]) -> None:
    """Stub the drift monitor's poll: rows `at[step]` fire at the poll after pass `step`
    (polls come every `window` passes), no others."""
    poll = controller.monitor.poll

    def forced():
        flags = torch.zeros_like(poll())
        for row in at.get(controller.step, []):
            flags[row] = True
        return flags

    controller.monitor.poll = forced
