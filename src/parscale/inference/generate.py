"""Text generation: prefill, then incremental decoding against a KV cache; sampling.

`generate(model, input_ids, attention_mask=None, max_new_tokens=..., ...)` returns the new token
ids [B, N]. Prompts are left-padded; a padded row generates exactly what it would alone, because
positions count real tokens only and padded keys are masked. Rows that hit an EOS id stop and are
padded with `pad_token_id` (default: the first EOS id, else 0); generation ends when every row
stopped or after max_new_tokens. Sampling (temperature, top-k, top-p) draws from a
`torch.Generator` seeded with `seed`, so a seeded call is reproducible; without a seed it draws from torch's
global RNG, as transformers' generate does (so `torch.manual_seed` makes it repeatable). As in
transformers, sampling keeps the 50 likeliest tokens unless top_k is given (by the caller or the folder's
generation_config.json), and `top_k=0` means no top-k.

Settings the caller leaves as None come from `generation_config` (default: `model.generation_config`,
which `parscale.load` reads from the folder's generation_config.json, as transformers does), else from
the library's defaults (32 new tokens, greedy, no EOS, top-k 50 when sampling). Pass
`generation_config={}` to ignore the file.
`repetition_penalty` r divides positive logits and multiplies negative ones by r for every token the
row has seen (its real prompt tokens and what it generated), as in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from parscale.inference.cache import KVCache
from parscale.inference.engine import engine_for


def validate_prompt(model, input_ids: torch.Tensor, attention_mask, max_new_tokens: int) -> None:
    """One clear error for each kind of bad request."""
    cfg = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, length]")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: input_ids must hold at least one token per row")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {input_ids.shape[1]} tokens + {max_new_tokens} new tokens = {total} exceeds the "
            f"model's {cfg.max_position_embeddings} positions (max_position_embeddings)"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"shape {tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
        if not bool(attention_mask.bool().any(dim=1).all()):
            raise ValueError("a row of the attention_mask has no real token: the prompt of that row is empty")
        if attention_mask.shape[1] > 1 and not bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all()):
            # New tokens follow the last column, so padding after a prompt would sit inside the sequence.
            raise ValueError("attention_mask is not left-padded: a row has padding (0) after a real token (1); "
                             "pad prompts on the left")


def validate_sampling(temperature, top_k, top_p, repetition_penalty=None) -> None:
    """One clear error for a sampling setting that would otherwise be ignored or misread (None: not given)."""
    if repetition_penalty is not None and (isinstance(repetition_penalty, bool) or not isinstance(
            repetition_penalty, (int, float)) or not math.isfinite(repetition_penalty) or repetition_penalty <= 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


# generation_config.json keys generate() takes, and the value each has when neither the caller nor the file
# gives one.
# transformers' defaults where a setting is left unset by the caller and the folder (top-k 50 when sampling)
GENERATION_DEFAULTS = {"max_new_tokens": 32, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": None,
                       "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": None}
GENERATION_KEYS = tuple(GENERATION_DEFAULTS)


def resolve_settings(model, generation_config: dict | None, **given) -> dict:
    """Each setting: the caller's if not None, else the generation config's, else GENERATION_DEFAULTS'."""
    file = (getattr(model, "generation_config", None) or {}) if generation_config is None else generation_config
    return {k: given[k] if given.get(k) is not None else file.get(k, GENERATION_DEFAULTS[k]) for k in GENERATION_KEYS}


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: seen tokens' logits divided by penalty if > 0, else multiplied."""
    logits = logits.float()
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k, top_p, generator):
    """Pick one token per row from last-position logits [B, V], on the logits' device."""
    if not do_sample or temperature == 0.0:
        return logits.argmax(dim=-1)
    # Softmax does not change under a shift: taking the row's largest logit off first keeps a tiny temperature
    # (1e-300) or a huge repetition penalty from turning logits into inf - inf = nan; such a row then samples
    # its largest logits, the limit the setting asks for.
    logits = logits.float().clamp(min=torch.finfo(torch.float32).min, max=torch.finfo(torch.float32).max)
    temperature = max(temperature, torch.finfo(torch.float32).tiny)  # below it the float32 divisor would be 0
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    use_engine: bool | None = None,
    repetition_penalty: float | None = None,
    generation_config: dict | None = None,
    compile: bool = False,
    padded_prefill: bool | None = None,
) -> torch.Tensor:
    """New token ids [B, max_new_tokens or fewer if every row stopped]; see the module docstring.

    on_token: called with the [B] tensor of each step's tokens (for streaming output); if it returns True,
    generation ends after that token (for every row).
    use_engine: decode with the static-cache engine (engine.py; a CUDA graph on GPU). Default: on
    CUDA yes, elsewhere no. Both paths give the same tokens.
    compile: the engine's decode step compiled by torch.compile (the first call compiles; faster steps after);
    it implies the engine, on CPU too.
    padded_prefill: the engine's prompt left-padded to 64, 128, ... tokens and run through one captured graph per
    length (engine.py; None: on for the graph engine, off with compile, where True compiles the padded prompt's
    forward too: ~30 s once per padded length, then 3.4 instead of 24-28 ms for 64 tokens of the 1.6B shape);
    True implies the engine, on CPU too.
    generation_config: defaults for the settings left as None (default: the model's, from its folder).
    """
    max_new_tokens_given = max_new_tokens
    settings = resolve_settings(model, generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, repetition_penalty=repetition_penalty)
    max_new_tokens, do_sample, temperature = settings["max_new_tokens"], settings["do_sample"], settings["temperature"]
    top_k, top_p, eos_token_id = settings["top_k"], settings["top_p"], settings["eos_token_id"]
    pad_token_id, repetition_penalty = settings["pad_token_id"], settings["repetition_penalty"]
    if max_new_tokens_given is None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        # A default length (e.g. an instruct model's 2048) stops at the model's last position, as in transformers.
        max_new_tokens = min(max_new_tokens, max(0, model.config.max_position_embeddings - input_ids.shape[1]))
    if top_k == 0:  # transformers' convention (generation_config.json included): 0 means no top-k
        top_k = None
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    validate_prompt(model, input_ids, attention_mask, max_new_tokens)
    validate_sampling(temperature, top_k, top_p, repetition_penalty)
    device = model.model.embed_tokens.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    b, t = input_ids.shape
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if max_new_tokens == 0:
        return input_ids.new_zeros(b, 0)
    generator = None  # unseeded sampling draws from torch's global RNG, so torch.manual_seed makes it repeatable
    if do_sample and seed is not None:  # a seed gets a generator of its own; the global RNG is left alone
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    mask = (attention_mask.to(device=device, dtype=torch.long) if attention_mask is not None
            else torch.ones(b, t, dtype=torch.long, device=device))
    if use_engine is None:
        # compiling and padding the prompt are the engine's: asking for either implies the engine
        use_engine = device.type == "cuda" or compile or bool(padded_prefill)
    if compile and not use_engine:
        raise ValueError("compile=True compiles the decode engine's step; it cannot be used with use_engine=False")
    if padded_prefill and not use_engine:
        raise ValueError("padded_prefill=True is the decode engine's prefill; it cannot be used with use_engine=False")
    if use_engine:
        engine = engine_for(model, compile=compile, padded_prefill=padded_prefill)
        logits = engine.prefill(input_ids, mask if attention_mask is not None else None, max_new_tokens)
    else:
        cache = KVCache.for_model(model, b, t + max_new_tokens)
        logits = model.last_logits(input_ids, attention_mask=mask, cache=cache)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)  # real prompt tokens
    out = []
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        emitted = torch.where(done, torch.full_like(token, pad), token)  # finished rows show padding
        out.append(emitted)
        if on_token is not None and on_token(emitted):
            break  # the caller saw what it waited for (a stop string, say)
        if eos:
            done = done | torch.isin(emitted, eos_t)
            # Asking the device whether every row stopped waits for it; ask every 8 tokens.
            if (step % 8 == 7 or on_token is not None) and bool(done.all()):
                break
        if step + 1 == max_new_tokens:
            break
        if use_engine:
            logits = engine.decode(token)
        else:
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            logits = model.last_logits(token[:, None], attention_mask=mask, cache=cache)
    tokens = torch.stack(out, dim=1)
    if eos and bool(done.all()):
        # Drop the all-padding columns after the step at which the last row stopped.
        finished = torch.stack([torch.isin(c, eos_t) for c in out], 1).long().cummax(1).values.all(0)
        tokens = tokens[:, : int(finished.long().argmax()) + 1]
    return tokens
