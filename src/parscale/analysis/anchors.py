"""Plain-model anchors timed in the same process as the ParScale points of `parscale bench --anchors`.

Machines of one kind differ by 10–20%, so a speed claim is a ratio against an anchor measured in the same
run. The anchor here is what a user of a plain model would pick first: Hugging Face transformers' own
model of the family (Qwen2, Llama or Qwen3) for the same shape with P = 1, random bf16 weights, greedy
`generate` with the static cache (on CUDA, generate compiles the forward itself for that cache).

decode ms/token = (time to generate `long` tokens − time to generate `short`) / (long − short), each the
median of `repeats` timed calls after two warm-up calls, so the prefill and generate's set-up cancel.
"""

from __future__ import annotations

import statistics
import time

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
