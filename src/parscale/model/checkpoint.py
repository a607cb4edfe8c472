"""Hugging Face checkpoint folders in and out: config.json + (sharded) safetensors, strictly.

Reads `model_type` qwen2_parscale (the released ParScale checkpoints), qwen2, llama, qwen3 (and this
library's llama_parscale / qwen3_parscale). Tensor names are the Hugging Face ones; the model's own
module names match them, so the state dict maps one to one:
    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ q/k/v bias for qwen2, q_norm/k_norm for qwen3)
    model.layers.{i}.self_attn.prefix_k | prefix_v      [P, kv_heads, n_tokens, head_dim]   (P > 1)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight
    model.aggregate_layer.{0,2}.weight | bias            (P > 1)

Loading is strict (one error lists every missing, unexpected and mis-shaped tensor) and memory-mapped:
each tensor is a view of the file's pages until it is cast or moved, so a large checkpoint never
needs two copies in RAM. Saving is atomic: everything is written into a temporary folder next to
the target, which is then renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from parscale.io.files import check_writable, publish_folder, real_target, temporary_folder
from parscale.io.ownership import is_owned
from parscale.model.config import ModelConfig
from parscale.model.transformer import ParScaleForCausalLM

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked: the message names the problem."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def parse_device(device) -> torch.device | None:
    """None, or a device this machine has: one clear error for a misspelt one or a GPU that is not there
    (instead of torch's assertion deep inside the first copy)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {str(device)!r} ({e})") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: this machine has no CUDA GPU (use cpu)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), cuda:0..{count - 1}")
    return device


# ----------------------------------------------------------------------------------------------
# Reading
def model_folder(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The model folder a path names: a model folder itself, a training run's latest checkpoint, or the
    local snapshot of a Hub id `org/name` (at `revision`; io/hub.py)."""
    from parscale.io.hub import resolve
    from parscale.training.run_folder import latest_checkpoint

    folder = resolve(path, revision)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        ckpt = latest_checkpoint(folder)
        if ckpt is not None:
            return ckpt / "model"
    return folder


def read_config(path: str | os.PathLike, revision: str | None = None) -> ModelConfig:
    folder = model_folder(path, revision)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{str(folder)!r} is not a checkpoint: it has no config.json")
    try:
        data = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not UTF-8 text (byte {e.start}): not a config.json") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    try:
        return ModelConfig.from_hf_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = set(weight_map.values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map of "
                                  f"tensor names to file names)") from None
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{index}: weight_map values must be file names")
        files = sorted({folder / name for name in names})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{str(folder)!r} has no model.safetensors and no model.safetensors.index.json")


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """The validated header of a safetensors file and the offset of its data.

    Every tensor's dtype must be known, its shape non-negative integers, its byte range inside the
    file and exactly as long as dtype × shape, and no two ranges may overlap: a truncated or
    corrupt file gets one error naming the file and the tensor, never a raw runtime error later.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file (header of {header_len} bytes "
                                  f"in a file of {size})")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    base, data_len = 8 + header_len, size - 8 - header_len
    ranges = []
    for name, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name} has a corrupt header entry {info!r}") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {dtype_name}")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{file}: tensor {name} has an invalid shape {shape}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype_name].itemsize
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
            raise CheckpointError(f"{file}: tensor {name} has invalid data offsets {[start, end]}")
        if end > data_len:
            raise CheckpointError(f"{file} is truncated: tensor {name} needs bytes {start}..{end} of the data "
                                  f"but the file holds {data_len}")
        if end - start != nbytes:
            raise CheckpointError(f"{file}: tensor {name} of shape {shape} ({dtype_name}) needs {nbytes} bytes, "
                                  f"its offsets give {end - start}")
        ranges.append((start, end, name))
    ranges.sort()
    for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:], strict=False):
        if start_b < end_a:
            raise CheckpointError(f"{file}: tensors {a} and {b} overlap")
    return header, base


def mmap_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file as views of a private memory map of it (no copy)."""
    header, base = read_safetensors_header(file)
    size = file.stat().st_size
    raw = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(file), False, size))
    out = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        chunk = raw[base + start : base + end]
        if (base + start) % dtype.itemsize:
            chunk = chunk.clone()  # misaligned for a dtype view: copy this one tensor
        out[name] = chunk.view(dtype).view(info["shape"])
    return out


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = ParScaleForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_tensor_set(expected: dict[str, tuple], found: dict[str, tuple], what: str, notes: list[str] = ()) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped tensor (names → shapes);
    `what` names the file set, `notes` are explanations put first. Used for models and adapters alike."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what}:", *notes]
    if missing:
        lines.append(f"  missing ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:20])}"
                     f"{' ...' if len(unexpected) > 20 else ''}")
    for k in misshaped[:20]:
        lines.append(f"  mis-shaped: {k} is {tuple(found[k])}, expected {tuple(expected[k])}")
    raise CheckpointError("\n".join(lines))


def _check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    expected = _expected_shapes(config)
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding): accept it.
    if config.tie_word_embeddings and "lm_head.weight" in found:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    notes = []
    prefix_bad = [k for k in sorted(set(expected) & set(found)) if k.endswith(("prefix_k", "prefix_v"))
                  and expected[k] != found[k]]
    if prefix_bad:
        k = prefix_bad[0]
        notes.append(f"  config says parscale_n={config.parscale_n}, parscale_n_tokens={config.parscale_n_tokens} "
                     f"(prefix shape {expected[k]}), but {k} has shape {found[k]}")
    if not config.has_prefix and any(k.endswith(("prefix_k", "prefix_v")) for k in set(found) - set(expected)):
        notes.append("  the tensors contain ParScale prefixes but the config has parscale_n=1")
    check_tensor_set(expected, found, f"checkpoint {str(folder)!r} does not match its config.json "
                     f"({config.model_type})", notes)
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        raise CheckpointError(f"checkpoint {str(folder)!r}: every weight must be a floating-point tensor; "
                              f"{', '.join(not_float[:8])}{' ...' if len(not_float) > 8 else ''} "
                              f"{'is' if len(not_float) == 1 else 'are'} {tensors[not_float[0]].dtype}")


def load(path, dtype=None, device=None, revision: str | None = None) -> ParScaleForCausalLM:
    """Load a Hugging Face folder, a training run folder (its latest checkpoint), a Hub id `org/name` or a
    GGUF file (model/gguf.py) as a model in eval mode.

    dtype: None keeps the stored dtype; 'bfloat16' / torch.float16 / ... casts while loading.
    device: where the parameters end up (default CPU).
    revision: a branch, tag or commit of a Hub id.
    The folder's generation_config.json, if any, becomes `model.generation_config` (a dict), the
    defaults `generate` uses for settings its caller leaves out.
    """
    from parscale.model.gguf import is_gguf

    if is_gguf(path):  # a GGUF file: dequantised into a temporary folder (model/gguf.py), then loaded
        import tempfile

        from parscale.model.gguf import gguf_to_folder

        with tempfile.TemporaryDirectory(prefix="parscale-gguf-load-") as tmp:
            folder = gguf_to_folder(path, Path(tmp) / "model", dtype="float32")
            return load(folder, dtype=dtype, device=device)
    dtype, device = parse_dtype(dtype), parse_device(device)
    folder = model_folder(path, revision)
    config = read_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        for name, t in mmap_safetensors(file).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name} appears in more than one shard of {str(folder)!r}")
            tensors[name] = t
    _check_tensors(config, tensors, folder)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    stored = tensors["model.embed_tokens.weight"].dtype
    target = dtype or stored
    state = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    model = ParScaleForCausalLM.from_state_dict(config, state, device).eval()
    model.generation_config = read_generation_config(folder)
    return model


def read_generation_config(folder) -> dict:
    """The settings of a folder's generation_config.json that `generate` understands ({} if it has none)."""
    from parscale.inference.generate import GENERATION_KEYS

    file = Path(folder) / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    settings = {k: data[k] for k in GENERATION_KEYS if data.get(k) is not None}
    for k in ("eos_token_id", "pad_token_id"):  # transformers takes an id or a list of ids, never a string
        v = settings.get(k)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise CheckpointError(f"{file}: {k} must be a token id or a list of them, got {v!r}")
    for k in ("max_new_tokens", "top_k"):
        v = settings.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise CheckpointError(f"{file}: {k} must be an integer >= 0, got {v!r}")
    for k in ("temperature", "top_p", "repetition_penalty"):
        v = settings.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise CheckpointError(f"{file}: {k} must be a number, got {v!r}")
    if "do_sample" in settings and not isinstance(settings["do_sample"], bool):
        raise CheckpointError(f"{file}: do_sample must be true or false, got {settings['do_sample']!r}")
    return settings


def load_tokenizer(path, revision: str | None = None):
    """The Hugging Face `tokenizers.Tokenizer` in a folder's tokenizer.json (or at that file, or of a Hub id)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir() or not p.exists():
        p = model_folder(path, revision)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise CheckpointError(f"no tokenizer.json at {str(p)!r}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        raise CheckpointError(f"{file} is not a tokenizer.json the tokenizers library can read "
                              f"({str(e).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------------------------
# Writing
def state_for_saving(model: ParScaleForCausalLM, dtype=None) -> dict[str, torch.Tensor]:
    from parscale.inference.quantize import is_quantized

    if is_quantized(model):
        raise CheckpointError("this model's projections are int8-quantized (inference only): the released format "
                              "holds float weights, so save the model before quantizing it")
    dtype = parse_dtype(dtype)
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        state[k] = v.to("cpu").contiguous().clone()
    return state


# What a model folder written by parscale holds; `save` replaces these and nothing else.
MODEL_FILES = ("config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
               *TOKENIZER_FILES)


def save(model: ParScaleForCausalLM, path, tokenizer_from=None, dtype=None, max_shard_bytes: int = 5 * 2**30,
         overwrite: bool = False, base_model: str | None = None, training: dict | None = None,
         card_name: str | None = None):
    """Write model (and tokenizer files copied from `tokenizer_from`, a folder) as a HF folder, atomically.

    The folder is written beside the target and renamed into place. A target that holds anything is
    refused unless overwrite=True, which replaces only what parscale wrote there (io/ownership.py) and
    never another file. A model card (README.md, card.py) is written with base_model and training facts
    when given; a README.md that parscale did not write is kept as it is, with a note on stderr.
    """
    import sys

    from parscale.model.card import model_card

    target = real_target(path)
    users_card = (target / "README.md").exists() and not is_owned(target, "README.md")
    owned = MODEL_FILES if users_card else (*MODEL_FILES, "README.md")
    target = check_writable(target, owned, overwrite)
    state = state_for_saving(model, dtype)
    stored = state["model.embed_tokens.weight"].dtype
    hf = model.config.to_hf_dict()
    # transformers 4 reads `torch_dtype`, transformers 5 `dtype`: both name the stored dtype, never two.
    hf["torch_dtype"] = hf["dtype"] = DTYPE_NAMES.get(stored, str(stored).removeprefix("torch."))
    tmp = temporary_folder(target)
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if users_card:
            print(f"note: {target / 'README.md'} was not written by parscale and is kept; no model card written",
                  file=sys.stderr)
        else:
            card = model_card(model.config, card_name or target.name, base_model=base_model, training=training)
            (tmp / "README.md").write_text(card, encoding="utf-8")
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, target, owned, overwrite)


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict) -> None:
    """safetensors' save_file, with its I/O failures (disk full, file-size limit) raised as OSError."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors releases do not export it
        SafetensorError = Exception  # noqa: N806
    try:
        save_file(tensors, str(file), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {file}: {e}") from None


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(shards[0], folder / "model.safetensors", meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / name, meta)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
