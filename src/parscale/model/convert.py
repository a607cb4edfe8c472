"""Give a trained P = 1 model P parallel streams: same backbone, fresh prefixes and aggregator.

    new_model = add_streams(model, parscale_n=4)           # in memory
    parscale convert --model SRC --out DST --streams 4     # folder to folder, released format

The backbone tensors are shared with (not copied from) the source model. The new parameters are
initialised as `ParScaleForCausalLM.init_parscale_parameters` documents; with the zero-initialised
last aggregator layer the streams start with uniform weights 1/P.
"""

from __future__ import annotations

import torch

from parscale.model.config import ModelConfig
from parscale.model.transformer import ParScaleForCausalLM, parscale_generator


def add_streams(model: ParScaleForCausalLM, parscale_n: int, n_tokens: int = 48, smooth: float = 0.1,
                seed: int = 0, p1_prefix: bool = False) -> ParScaleForCausalLM:
    """P streams on a P = 1 model; with parscale_n = 1 and p1_prefix=True, the prefix control instead: the
    same model with a learned n_tokens prefix in every layer and no aggregator (a two-stage run's control)."""
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
    new.init_parscale_parameters(parscale_generator(seed))
    if getattr(model, "generation_config", None) is not None:  # the folder's defaults travel with the weights
        new.generation_config = dict(model.generation_config)
    return new.train(model.training)
