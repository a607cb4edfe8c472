"""Prefix reparameterisation for training: each stream's prefixes produced by a small MLP.

The released checkpoints hold merged prefixes; the authors trained them through a reparameterisation
(their issue #1), which also avoids the unstable raw-prefix training users reported (issue #2). Here
every attention layer's `prefix_k` and `prefix_v` becomes, through `torch.nn.utils.parametrize`,

    prefix = Linear(hidden → kv_heads·head_dim)(tanh(Linear(d_latent → hidden)(latent)))

with a learned latent [P, n_tokens, d_latent] per layer and tensor. The model's code is unchanged
(a parametrization is applied from outside), and `merged_copy(model)` returns the model with plain
prefix parameters again, which is what checkpoints and adapters store. The last layer is scaled at
start so the produced prefixes have the standard deviation the plain prefixes had.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


class PrefixMLP(nn.Module):
    def __init__(self, prefix: torch.Tensor, d_latent: int = 64, hidden: int = 256, seed: int = 0):
        super().__init__()
        p, kv, n, hd = prefix.shape
        self.shape = (p, kv, n, hd)
        gen = torch.Generator().manual_seed(seed)
        self.latent = nn.Parameter(torch.randn(p, n, d_latent, generator=gen))
        self.up = nn.Linear(d_latent, hidden)
        self.out = nn.Linear(hidden, kv * hd)
        with torch.no_grad():
            for layer in (self.up, self.out):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / layer.weight.shape[1] ** 0.5)
                layer.bias.zero_()
            # Built on the CPU (seeded), scaled with host numbers, then moved: the prefix may live on a GPU.
            target = max(float(prefix.detach().float().std()), 1e-6)
            self.out.weight.mul_(target / float(self._produce().std()))
        self.to(device=prefix.device, dtype=prefix.dtype)

    def _produce(self) -> torch.Tensor:
        p, kv, n, hd = self.shape
        return self.out(torch.tanh(self.up(self.latent))).view(p, n, kv, hd).transpose(1, 2)

    def forward(self, _stored: torch.Tensor) -> torch.Tensor:
        return self._produce()


def enable_prefix_reparam(model, d_latent: int = 64, hidden: int = 256, seed: int = 0) -> None:
    if not model.config.has_prefix:
        raise ValueError("prefix reparameterisation needs prefixes (P > 1 or the P = 1 prefix control)")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for j, name in enumerate(("prefix_k", "prefix_v")):
            mlp = PrefixMLP(getattr(attn, name), d_latent, hidden, seed=seed * 1000 + 2 * i + j)
            parametrize.register_parametrization(attn, name, mlp)
            # The stored tensor is ignored while the MLP produces the prefix: it must not train.
            attn.parametrizations[name].original.requires_grad_(False)


def has_prefix_reparam(model) -> bool:
    return any(parametrize.is_parametrized(layer.self_attn) for layer in model.model.layers)


@torch.no_grad()
def merged_copy(model):
    """A new model whose prefixes are the produced ones, stored as plain parameters (released format).

    The original is left untouched and keeps training through its MLPs. (A deep copy followed by
    `remove_parametrizations` is not safe: on some torch versions the copy shares the original's
    generated class, and removing the property from it broke the original model.)
    """
    if not has_prefix_reparam(model):
        return model
    from parscale.model.transformer import ParScaleForCausalLM

    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for i, layer in enumerate(model.model.layers):
        for name in ("prefix_k", "prefix_v"):
            state[f"model.layers.{i}.self_attn.{name}"] = getattr(layer.self_attn, name).detach().clone()
    device = model.model.embed_tokens.weight.device
    return ParScaleForCausalLM.from_state_dict(model.config, state, device).train(model.training)


def reparam_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".parametrizations." in k
            and not k.endswith(".original")}


def load_reparam_state(model, state: dict[str, torch.Tensor]) -> None:
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if ".parametrizations." in k
           and not k.endswith(".original")}
    if set(own) != set(state):
        raise ValueError(f"reparameterisation state does not match the model: missing {sorted(set(own) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(own))}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
