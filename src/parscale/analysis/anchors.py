"""Plain-model anchors timed in the same process as the ParScale points of `parscale bench --anchors`.

Machines of one kind differ by 10–20%, so a speed claim is a ratio against an anchor measured in the same
run. The anchor here is what a user of a plain model would pick first: Hugging Face transformers' own
model of the family (Qwen2, Llama or Qwen3) for the same shape with P = 1, random bf16 weights, greedy
`generate` with the static cache (on CUDA, generate compiles the forward itself for that cache). With
`--gptfast-model PATH` also gpt-fast's plain Transformer (its compiled, CUDA-graphed decode step), the fastest
plain decoder of the same shape a user is likely to have: the user's own copy of its model.py is imported
from PATH and run; parscale ships none of it.

transformers: decode ms/token = (time to generate `long` tokens − time to generate `short`) / (long − short), each the
median of `repeats` timed calls after two warm-up calls, so the prefill and generate's set-up cancel.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from parscale.model.config import ModelConfig

HF_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_plain_model(shape: str, device="cuda", dtype=torch.bfloat16):
    """transformers' own P = 1 model of a parscale preset shape, with random weights."""
    import transformers

    cfg = ModelConfig.preset(shape, parscale_n=1, max_position_embeddings=4096)
    hf_dict = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    hf_config = transformers.AutoConfig.for_model(**hf_dict)
    model_class = getattr(transformers, HF_ARCHITECTURES[cfg.family])
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(hf_config)
    return model.to(dtype).eval()


def _timed_s(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def hf_static_cache_anchor(shape: str, batch: int = 1, length: int = 64, short: int = 32, long: int = 160,
                           repeats: int = 3, device="cuda", dtype=torch.bfloat16) -> dict:
    """Decode ms/token of transformers' static-cache greedy generate for `shape` (P = 1), `length` prompt tokens."""
    import transformers

    if not 0 < short < long:
        raise ValueError(f"need 0 < short < long, got {short} and {long}")
    device = torch.device(device)
    model = hf_plain_model(shape, device, dtype)
    model.generation_config.cache_implementation = "static"
    model.generation_config.pad_token_id = 0
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), device=device, generator=gen)

    def generate(n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        if out.shape[1] != length + n:
            raise RuntimeError(f"generate returned {out.shape[1] - length} new tokens, asked for {n}")

    warm_start = time.perf_counter()
    generate(short)
    generate(long)  # compilation and cache allocation happen in these
    warmup_s = time.perf_counter() - warm_start
    short_s = statistics.median(_timed_s(lambda: generate(short), device) for _ in range(repeats))
    long_s = statistics.median(_timed_s(lambda: generate(long), device) for _ in range(repeats))
    result = {"anchor": "transformers static cache", "shape": shape, "P": 1, "batch": batch, "length": length,
              "decode_ms_per_token": (long_s - short_s) / (long - short) * 1000.0,
              "generate_short_s": short_s, "generate_long_s": long_s, "tokens": [short, long],
              "warmup_s": warmup_s, "transformers": transformers.__version__,
              "parameters": sum(p.numel() for p in model.parameters())}
    return result


def load_gptfast_module(model_file: str | Path):
    """Import a user's copy of gpt-fast's `model.py` (pytorch-labs/gpt-fast) from its path.

    parscale ships no gpt-fast code: the file is the user's, run from where it lies."""
    path = Path(model_file)
    if not path.is_file():
        raise FileNotFoundError(f"gpt-fast model file {path} does not exist (pass the path of gpt-fast's model.py)")
    spec = importlib.util.spec_from_file_location("gptfast_model_anchor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the compiler re-imports the module of the code it traces by name
    spec.loader.exec_module(module)
    missing = [name for name in ("Transformer", "ModelArgs") if not hasattr(module, name)]
    if missing:
        raise ValueError(f"{path} defines no {' or '.join(missing)}: is it gpt-fast's model.py?")
    return module


@torch.no_grad()
def gptfast_anchor(shape: str, model_file: str | Path, batch: int = 1, length: int = 64, chunk: int = 16,
                   device="cuda", dtype=torch.bfloat16, compile: bool = True) -> dict:
    """Decode ms/token of gpt-fast's plain Transformer for `shape` (P = 1), timed as `parscale bench` times a point.

    The model is built from the preset's sizes with random weights; the decode step is compiled the way
    gpt-fast's generate.py compiles it (mode="reduce-overhead", fullgraph, coordinate-descent tuning, the math
    SDPA backend), with its cache of `2 × length` slots; the prompt of `length` tokens is prefilled eagerly,
    then `length − 1` tokens are decoded in chunks of `chunk` steps, each chunk timed with CUDA events; the
    result is the median per-token time over the chunks of a second pass (the first compiles and captures).
    The inductor settings are restored afterwards, so points timed later in the process are unaffected."""
    import torch._inductor.config as inductor_config

    from parscale.analysis.bench import _events_ms  # the timer of every bench point

    if length <= 2 * chunk:
        raise ValueError(f"length {length} is too short to time chunks of {chunk} decode steps (need > {2 * chunk})")
    module = load_gptfast_module(model_file)
    device = torch.device(device)
    cfg = ModelConfig.preset(shape, parscale_n=1)
    args = module.ModelArgs(block_size=2 * length, vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
                            n_head=cfg.num_attention_heads, dim=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, n_local_heads=cfg.num_key_value_heads,
                            rope_base=cfg.rope_theta, norm_eps=cfg.rms_norm_eps)
    torch.manual_seed(0)
    with torch.device(device):
        model = module.Transformer(args)
    model = model.to(dtype).eval()
    with torch.device(device):
        model.setup_caches(batch, 2 * length)

    def decode_one(token, input_pos):
        return model(token, input_pos)[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True) if compile else decode_one
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=device, generator=gen)
    timer = _events_ms if device.type == "cuda" else (lambda fn: _timed_s(fn, device) * 1000.0)

    def decode_all(record):
        token = model(ids, torch.arange(length, device=device))[:, -1].argmax(-1, keepdim=True)
        input_pos = torch.tensor([length], device=device, dtype=torch.int)
        for _ in range((length - 1) // chunk):
            def run_chunk():
                nonlocal token
                for _ in range(chunk):
                    token = step(token, input_pos).clone()
                    input_pos.add_(1)

            record.append(timer(run_chunk) / chunk)

    settings = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True}
    with inductor_config.patch(settings), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        warm_start = time.perf_counter()
        decode_all([])
        warmup_s = time.perf_counter() - warm_start
        per_token: list[float] = []
        decode_all(per_token)
    return {"anchor": "gpt-fast", "shape": shape, "P": 1, "batch": batch, "length": length, "cache_len": 2 * length,
            "decode_ms_per_token": statistics.median(per_token), "decode_ms_min": min(per_token),
            "decode_ms_max": max(per_token), "warmup_s": warmup_s, "model_file": str(model_file),
            "inductor": settings, "parameters": sum(p.numel() for p in model.parameters())}
