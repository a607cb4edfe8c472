"""Give a trained P = 1 model P parallel streams: same backbone, fresh prefixes and aggregator.

    new_model = add_streams(model, parscale_n=4)           # in memory
    parscale convert --model SRC --out DST --streams 4     # folder to folder, released format

The backbone tensors are shared with (not copied from) the source model. The new parameters are
initialised as `ParScaleForCausalLM.init_parscale_parameters` documents; with the zero-initialised
last aggregator layer the streams start with uniform weights 1/P.

`prefix_init="backbone"` takes the prefixes from the trained backbone itself instead: every prefix slot of
every layer holds the source model's own key and value of one random vocabulary token at position 0 (where
RoPE is the identity, as for the prefix), a different token for every slot and stream, keys scaled by
BACKBONE_KEY_SCALE. A trained model's attention treats such slots as the start-of-sequence tokens it has
seen, so the new model starts near the P = 1 model, and the streams differ. Measured on
SmolLM2-135M-Instruct, P = 4 with 16 prefix tokens, held-out loss at the start (P = 1: 2.791, docs/LOG.md):
the random init 10.486, the random init scaled by 0.1 3.306, backbone prefixes 2.922 (tokens from the
vocabulary) / 2.901 (tokens from text), with keys unscaled 3.049. Whether it also trains better is for the
two-stage experiments to show.
"""

from __future__ import annotations

import torch

from parscale.model.config import ModelConfig
from parscale.model.transformer import ParScaleForCausalLM, parscale_generator

PREFIX_INITS = ("random", "backbone")
BACKBONE_KEY_SCALE = 0.5  # the best of 0, 0.1, 0.25, 0.5, 1, 1.5 and 3 on SmolLM2 (docs/LOG.md)


def add_streams(model: ParScaleForCausalLM, parscale_n: int, n_tokens: int = 48, smooth: float = 0.1,
                seed: int = 0, p1_prefix: bool = False, prefix_init: str = "random") -> ParScaleForCausalLM:
    """P streams on a P = 1 model; with parscale_n = 1 and p1_prefix=True, the prefix control instead: the
    same model with a learned n_tokens prefix in every layer and no aggregator (a two-stage run's control).
    prefix_init: "random" (init_parscale_parameters) or "backbone" (the module docstring)."""
    if prefix_init not in PREFIX_INITS:
        raise ValueError(f"prefix_init must be one of {', '.join(PREFIX_INITS)}, got {prefix_init!r}")
    src = model.config
    if src.parscale_n != 1 or src.parscale_p1_prefix:
        raise ValueError(f"the source model already has parscale_n={src.parscale_n}"
                         f"{' and a prefix' if src.parscale_p1_prefix else ''}; convert takes a plain P = 1 model")
    if p1_prefix and parscale_n != 1:
        raise ValueError(f"p1_prefix is the P = 1 prefix control; it needs parscale_n = 1, got {parscale_n}")
    if parscale_n < 2 and not p1_prefix:
        raise ValueError(f"parscale_n must be >= 2 to add streams, got {parscale_n}")
    cfg: ModelConfig = src.replace(parscale_n=parscale_n, parscale_n_tokens=n_tokens, parscale_attn_smooth=smooth,
                                   parscale_p1_prefix=p1_prefix)
    ref = model.model.embed_tokens.weight
    with torch.device("meta"):
        new = ParScaleForCausalLM(cfg)
    state = dict(model.state_dict())
    for name, param in new.state_dict().items():
        if name not in state:  # a ParScale parameter: materialise, then initialise below
            state[name] = torch.zeros(param.shape, dtype=ref.dtype, device=ref.device)
    new = ParScaleForCausalLM.from_state_dict(cfg, state, ref.device)
    gen = parscale_generator(seed)
    new.init_parscale_parameters(gen)
    if prefix_init == "backbone":
        slots = cfg.parscale_n * n_tokens
        token_ids = torch.randint(0, src.vocab_size, (slots,), generator=gen)
        for layer, (k, v) in zip(new.model.layers, backbone_keys_values(model, token_ids), strict=True):
            shape = layer.self_attn.prefix_k.shape  # [P, kv_heads, n, head_dim]; slot s = stream s // n
            with torch.no_grad():
                layer.self_attn.prefix_k.copy_((k * BACKBONE_KEY_SCALE).view(shape[0], shape[2], shape[1], shape[3])
                                               .transpose(1, 2))
                layer.self_attn.prefix_v.copy_(v.view(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2))
    if getattr(model, "generation_config", None) is not None:  # the folder's defaults travel with the weights
        new.generation_config = dict(model.generation_config)
    return new.train(model.training)


@torch.no_grad()
def backbone_keys_values(model: ParScaleForCausalLM, token_ids: torch.Tensor) -> list[tuple]:
    """Every layer's key and value of each token alone at position 0 (RoPE there is the identity, so they are
    what the layer would hold for a first token): [(k, v), ...], each [tokens, kv_heads, head_dim]."""
    captured = []

    def keep(attention, args, kwargs):
        captured.append((attention, args[0] if args else kwargs["x"]))

    hooks = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    try:
        model(token_ids.to(model.model.embed_tokens.weight.device)[:, None])
    finally:
        for hook in hooks:
            hook.remove()
    out = []
    for attention, x in captured:  # x: the layer's normed input, [tokens, 1, hidden]
        if hasattr(attention, "qkv_proj"):
            _, k, v = attention.qkv_proj(x).split(attention.qkv_sizes, dim=-1)
        else:
            k, v = attention.k_proj(x), attention.v_proj(x)
        k = k.view(-1, attention.n_kv, attention.head_dim)
        v = v.view(-1, attention.n_kv, attention.head_dim)
        if hasattr(attention, "k_norm"):
            k = attention.k_norm(k)
        out.append((k.float(), v.float()))
    return out
