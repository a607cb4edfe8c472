"""KV caches whose first n_tokens slots of every stream hold that stream's prefix.

`k` and `v` are lists of one buffer per layer, each [P·B, kv_heads, n_tokens + max_len, head_dim] (row
`p·B + b`, as in model.py). Real tokens go to slots n_tokens + position. `length` counts real (and padding) tokens
stored so far, excluding the prefix, so positions seen by the model are those of a plain P = 1 model.

Two kinds:
- `KVCache`: the reference path. Made for one request (`KVCache.for_model`), its prefix slots are
  copied from the model's parameters when it is made.
- `StaticKVCache`: the decode cache a model owns (`model.setup_cache(batch, max_len)`), reused across
  requests and by the CUDA-graph engine. `reset(model)` starts a request and rewrites the prefix
  slots from the model's *current* parameters, so an optimizer step, `load_state_dict` or `copy_`
  between two requests is always seen (a cache that copied the prefixes once would silently decode
  with stale ones).

Usage (reference path):
    cache = KVCache.for_model(model, batch_size=2, max_len=prompt_len + max_new_tokens)
    logits = model(prompt_ids, attention_mask=mask, cache=cache)   # prefill
    logits = model(next_ids, attention_mask=mask_plus_one, cache=cache)  # one decode step
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers, batch_size, parscale_n, n_kv, prefix_len, max_len, head_dim, dtype, device):
        # One tensor per layer, not one [layers, ...] tensor: a compiled step that writes a slot into a view
        # of one big buffer gets that whole buffer copied every step (inductor functionalises the write into
        # a view of a graph input); a write into a whole input it keeps in place.
        shape = (parscale_n * batch_size, n_kv, prefix_len + max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.dtype, self.device = dtype, self.k[0].device if self.k else torch.device(device)
        self.prefix_len = prefix_len
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = model.config
        ref = model.model.embed_tokens.weight
        dtype, device = dtype or ref.dtype, device or ref.device
        cache = cls(cfg.num_hidden_layers, batch_size, cfg.parscale_n, cfg.num_key_value_heads, cfg.prefix_len,
                    max_len, cfg.head_dim, dtype, device)
        cache.write_prefixes(model)
        return cache

    @torch.no_grad()
    def write_prefixes(self, model) -> None:
        """Copy every layer's prefix_k / prefix_v (as they are now) into the prefix slots."""
        if not model.config.has_prefix:
            return
        n, b = self.prefix_len, self.batch_size
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            self.k[i][:, :, :n].copy_(attn.prefix_k.to(self.dtype).repeat_interleave(b, dim=0))
            self.v[i][:, :, :n].copy_(attn.prefix_v.to(self.dtype).repeat_interleave(b, dim=0))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store new keys/values of one layer; return this layer's prefix + every stored token."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        start = self.prefix_len + self.length
        self.k[layer][:, :, start : start + t] = k
        self.v[layer][:, :, start : start + t] = v
        return self.k[layer][:, :, : self.prefix_len + end], self.v[layer][:, :, : self.prefix_len + end]

    def advance(self, t: int) -> None:
        self.length += t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class StaticKVCache(KVCache):
    """A KVCache that can also decode with fixed shapes (for CUDA graphs and torch.compile).

    Prefill works as in KVCache (host-side `length`). `start_decoding(mask)` then switches to decode
    mode: the write slot is the device tensor `pos`, keys are read over the whole buffer, and
    `key_valid` [B, max_len] says which slots hold real tokens (left padding and unwritten slots are
    hidden). Nothing in a decode step depends on a host value, so one captured step replays for
    every position and every prompt length up to max_len.
    """

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype=None, device=None) -> StaticKVCache:
        cache = super().for_model(model, batch_size, max_len, dtype, device)
        cache.decoding = False
        cache.pos = torch.zeros(1, dtype=torch.long, device=cache.device)
        cache.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=cache.device)
        cache.read_len = max_len  # real slots a decode step reads (the engine may bound it, see engine.py)
        cache.masked_prefill = False  # set by the engine's padded prefill: the model applies the mask unchecked
        return cache

    def fits(self, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this cache can serve a request of that shape for a model with that dtype and device."""
        return (self.batch_size == batch_size and self.max_len >= max_len and self.dtype == dtype
                and self.device == torch.device(device))

    def reset(self, model) -> None:
        """Empty it for the next request and rewrite the prefix slots from the model's live parameters.

        The token slots are zeroed too: a hidden slot gets attention weight 0, but 0 x NaN is NaN, so a
        non-finite value an earlier request left there (an fp16 overflow, say) would reach this one."""
        self.length, self.decoding = 0, False
        self.key_valid.zero_()
        for buffer in (*self.k, *self.v):
            buffer[:, :, self.prefix_len :].zero_()
        self.write_prefixes(model)

    def start_decoding(self, attention_mask: torch.Tensor | None) -> None:
        t = self.length
        if attention_mask is None:
            self.key_valid[:, :t] = True
        else:
            self.key_valid[:, :t] = attention_mask.bool()
        self.pos.fill_(t)
        self.decoding = True

    def decode_mask(self, parscale_n: int) -> torch.Tensor:
        """Bool [P·B, 1, 1, prefix + read_len]: the prefix, then every written real slot of the first read_len."""
        self.key_valid.index_fill_(1, self.pos, True)  # the token written in this step
        valid = self.key_valid[:, : self.read_len]
        mask = torch.cat([valid.new_ones(self.batch_size, self.prefix_len), valid], dim=1)
        return mask[:, None, None, :].repeat(parscale_n, 1, 1, 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self.decoding:
            return super().update(layer, k, v)
        slot = self.pos + self.prefix_len
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        end = self.prefix_len + self.read_len  # a host value, fixed for one captured step
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        if self.decoding:
            self.pos.add_(t)
        else:
            self.length += t
