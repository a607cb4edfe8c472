"""GGUF files (llama.cpp's format, how most local models are held) as Hugging Face folders parscale loads.

    folder = gguf_to_folder("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2", dtype="float32")
    parscale convert --model SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2-p4 --streams 4

Reading is transformers' own GGUF support (`from_pretrained(..., gguf_file=...)`, which needs the `gguf`
package, the ggml project's reader: `pip install parscale[gguf]`): it dequantises every tensor (Q4_0,
Q4_1, Q8_0, K-quants, F16, ...) and rebuilds the tokenizer (tokenizer.json, tokenizer_config.json with the
chat template and special tokens) from the file's metadata. The folder is then written by `parscale.save`,
so the weights are parscale's format (float32 or bfloat16) and the P = 1 model's logits are those of
transformers' model of the same file (tested on a GGUF the test writes, and recorded in the README for
SmolLM2-135M-Instruct). generation_config.json carries the file's end-of-text id and, for a chat model,
the end of turn of its template.

Architectures: llama, qwen2, qwen3 (the families parscale runs); any other is one error naming it, as is a
quantisation type the installed transformers cannot dequantise.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from parscale.model.checkpoint import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def is_gguf(path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading a GGUF file needs the gguf package (pip install gguf, or "
                              "pip install parscale[gguf])") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a damaged file
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value.tolist()[0]


def architecture(path) -> str:
    """The file's general.architecture, refused unless parscale runs it."""
    arch = _field(_reader(Path(path)), "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (parscale runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _end_of_turn_ids(tokenizer_dir: Path, eos_id: int | None) -> list[int]:
    """The file's EOS id, and the chat template's end-of-turn token if the template names one the tokenizer has
    (ChatML's <|im_end|>, Llama 3's <|eot_id|>): a chat model must stop at the end of its turn."""
    ids = [] if eos_id is None else [eos_id]
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    template = ""
    for name in ("chat_template.jinja",):
        if (tokenizer_dir / name).is_file():
            template = (tokenizer_dir / name).read_text(encoding="utf-8")
    config = tokenizer_dir / "tokenizer_config.json"
    if not template and config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") or ""
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if marker in template and marker in added and added[marker] not in ids:
            ids.append(added[marker])
    return ids


def gguf_to_folder(path, out, dtype="float32", streams: int = 1, n_tokens: int = 48, smooth: float = 0.1,
                   seed: int = 0, prefix_init: str = "random", overwrite: bool = False) -> Path:
    """Write the GGUF file at path as a parscale model folder at out (P = streams; see the module docstring)."""
    import torch

    import parscale
    from parscale.model.checkpoint import parse_dtype
    from parscale.model.convert import add_streams

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    if not is_gguf(path):
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    architecture(path)  # before the (slow) dequantisation
    reader = _reader(path)
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    del reader
    import transformers

    from parscale.io.files import check_writable

    check_writable(Path(out), ("*",), overwrite)
    work = Path(tempfile.mkdtemp(prefix="parscale-gguf-"))
    try:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (ValueError, NotImplementedError, KeyError) as e:
            raise CheckpointError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
        # A GGUF-loaded model refuses save_pretrained (transformers marks it quantised): the dequantised
        # tensors and the config are written as a plain Hugging Face folder instead.
        from safetensors.torch import save_file

        hf = work / "hf"
        hf.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (hf / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and config.get("tie_word_embeddings"))}
        save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(hf)
        (work / "hf" / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": _end_of_turn_ids(work / "hf", eos_id)}, indent=1) + "\n")
        del model
        converted = parscale.load(work / "hf", dtype=torch.float32)
        if streams > 1:
            converted = add_streams(converted, streams, n_tokens=n_tokens, smooth=smooth, seed=seed,
                                    prefix_init=prefix_init)
        return parscale.save(converted, out, tokenizer_from=work / "hf", dtype=parse_dtype(dtype),
                             overwrite=overwrite, base_model=path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
