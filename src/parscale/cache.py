"""A preallocated KV cache whose first n_tokens slots of every stream hold that stream's prefix.

Buffers have shape [layers, P·B, kv_heads, n_tokens + max_len, head_dim] (row `p·B + b`, as in
model.py). The prefixes are written once, when the cache is made; real tokens go to slots
n_tokens + position. `length` counts real (and padding) tokens stored so far, excluding the prefix,
so positions seen by the model are the same as for a plain P = 1 model.

Usage:
    cache = KVCache.for_model(model, batch_size=2, max_len=prompt_len + max_new_tokens)
    logits = model(prompt_ids, attention_mask=mask, cache=cache)   # prefill
    logits = model(next_ids, attention_mask=mask_plus_one, cache=cache)  # one decode step
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers, rows, n_kv, prefix_len, max_len, head_dim, dtype, device):
        shape = (n_layers, rows, n_kv, prefix_len + max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.prefix_len = prefix_len
        self.max_len = max_len
        self.length = 0

    @classmethod
    @torch.no_grad()
    def for_model(cls, model, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = model.config
        ref = model.model.embed_tokens.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        p = cfg.parscale_n
        cache = cls(cfg.num_hidden_layers, p * batch_size, cfg.num_key_value_heads, cfg.prefix_len, max_len,
                    cfg.head_dim, dtype, device)
        if p > 1:
            n = cfg.prefix_len
            for i, layer in enumerate(model.model.layers):
                attn = layer.self_attn
                cache.k[i, :, :, :n] = attn.prefix_k.to(dtype).repeat_interleave(batch_size, dim=0)
                cache.v[i, :, :, :n] = attn.prefix_v.to(dtype).repeat_interleave(batch_size, dim=0)
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store new keys/values of one layer; return this layer's prefix + every stored token."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        start = self.prefix_len + self.length
        self.k[layer, :, :, start : start + t] = k
        self.v[layer, :, :, start : start + t] = v
        return self.k[layer, :, :, : self.prefix_len + end], self.v[layer, :, :, : self.prefix_len + end]

    def advance(self, t: int) -> None:
        self.length += t

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class StaticKVCache(KVCache):
    """A KVCache that can also decode with fixed shapes (for CUDA graphs and torch.compile).

    Prefill works as in KVCache (host-side `length`). `start_decoding(mask)` then switches to decode
    mode: the write slot is the device tensor `pos`, keys are read over the whole buffer, and
    `key_valid` [B, max_len] says which slots hold real tokens (left padding and unwritten slots are
    hidden). Nothing in a decode step depends on a host value, so one captured step replays for
    every position. `reset()` empties it for the next request; the prefix slots stay as written.
    """

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        cache = super().for_model(model, batch_size, max_len, dtype, device)
        cache.batch_size, cache.decoding = batch_size, False
        cache.pos = torch.zeros(1, dtype=torch.long, device=cache.k.device)
        cache.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=cache.k.device)
        return cache

    def reset(self) -> None:
        self.length, self.decoding = 0, False
        self.key_valid.zero_()

    def start_decoding(self, attention_mask: torch.Tensor | None) -> None:
        t = self.length
        if attention_mask is None:
            self.key_valid[:, :t] = True
        else:
            self.key_valid[:, :t] = attention_mask.bool()
        self.pos.fill_(t)
        self.decoding = True

    def decode_mask(self, parscale_n: int) -> torch.Tensor:
        """Bool [P·B, 1, 1, prefix + max_len]: the prefix, then every written real slot."""
        self.key_valid.index_fill_(1, self.pos, True)  # the token written in this step
        mask = torch.cat([self.key_valid.new_ones(self.batch_size, self.prefix_len), self.key_valid], dim=1)
        return mask[:, None, None, :].repeat(parscale_n, 1, 1, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self.decoding:
            return super().update(layer, k, v)
        slot = self.pos + self.prefix_len
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        if self.decoding:
            self.pos.add_(t)
        else:
            self.length += t
