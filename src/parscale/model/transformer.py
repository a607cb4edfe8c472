"""The pure PyTorch transformer with parallel scaling (ParScale) built in.

Stream layout (the one the released checkpoints use, written down here once):
- The input of B sequences is copied P times into one batch of P·B rows, stream-major:
  row `p·B + b` is stream p of sequence b. Every backbone weight runs once on that batch.
- Every attention layer owns `prefix_k`, `prefix_v` of shape [P, kv_heads, n_tokens, head_dim],
  already in post-RoPE key space (no rotary embedding is applied to them). Stream p's queries see
  stream p's prefix plus the causal past of the real tokens; real tokens keep positions 0..T−1.
  In a KV cache the prefix occupies slots [0, n_tokens) of every row (see cache.py).
- After the final norm, the P hidden states of a token are concatenated interleaved
  (feature `h·P + p`), `Linear(P·H→H) → SiLU → Linear(H→P)` gives P scores, softmax in fp32,
  smoothing `w·(1−ε) + ε/P`, and the weighted sum of the P hidden states goes through the LM head.
- P = 1 is exactly the plain model: no prefix, no aggregator, the same computation as Qwen2/Llama/Qwen3.

Attention handles "prefix + causal + left padding" in one place (`_attend`):
- no padding and no cached past (training, unpadded prefill): n_tokens zero queries are prepended
  so that one square `is_causal=True` SDPA call (flash on GPU) lets every real query see the whole
  prefix; those rows are dropped afterwards. This is the cheapest measured flash-compatible route.
- otherwise (left padding, or decoding against a cache): an explicit boolean mask, built once per
  forward and shared by all layers. A query always sees itself so padded rows never produce NaN.

Initialisation (`init_weights`): every parameter is set explicitly. Linear and embedding weights
N(0, initializer_range²), biases 0, norm weights 1; the aggregator's last layer is zero so a new
model starts with uniform stream weights 1/P; prefixes are N(0, σ²) per layer with σ the typical
size of that layer's real keys (resp. values): std(W_k)·√hidden, so a prefix is neither negligible
nor dominant next to the real tokens, for a fresh model and for a converted pretrained one alike.
Compile, CUDA graphs, DDP and freezing are applied from outside; forward has no such branches. The
one structural choice forward follows is whether a layer's projections were fused for inference
(inference/fuse.py: `qkv_proj` for q/k/v, `gate_up_proj` for gate/up; the same function, fewer matmuls).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from parscale.model.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight (as Qwen2/Llama/Qwen3 do)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of RoPE, with 'linear' or 'llama3' scaling applied when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] on the last dimension. RoPE's rotate_half(x) = [-x2, x1]; its sign is folded into
    the sine once per forward (`_rope`), which saves a negation kernel per layer for q and for k and gives
    the same bits: (-a)·b and a·(-b) round alike."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k bias (Qwen2), q/k norm (Qwen3) and stream prefixes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.parscale_n, self.has_prefix = config.parscale_n, config.has_prefix
        if config.has_prefix:
            shape = (config.parscale_n, self.n_kv, config.parscale_n_tokens, self.head_dim)
            self.prefix_k = nn.Parameter(torch.zeros(shape))
            self.prefix_v = nn.Parameter(torch.zeros(shape))

    def projection_weight(self, name: str) -> torch.Tensor:
        """The weight of the q, k or v projection, whether the three are separate or fused."""
        if not hasattr(self, "qkv_proj"):
            return getattr(self, f"{name}_proj").weight
        start = {"q": 0, "k": self.qkv_sizes[0], "v": self.qkv_sizes[0] + self.qkv_sizes[1]}[name]
        return self.qkv_proj.weight[start: start + self.qkv_sizes["qkv".index(name)]]

    def forward(self, x, cos, sin, plan: AttentionPlan, cache=None, layer_idx: int = 0):
        if hasattr(self, "qkv_proj"):  # one matmul for the three (inference/fuse.py)
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attend(q, k, v, cos, sin, plan, cache, layer_idx))

    def attend(self, q, k, v, cos, sin, plan: AttentionPlan, cache=None, layer_idx: int = 0):
        """Attention from the projected q, k, v [n, t, heads·head_dim] to the o_proj input [n, t, heads·head_dim]
        (RoPE, q/k norm, the cache or the prefix): what lies between the layer's two products."""
        n, t, _ = q.shape
        q = q.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + swap_halves(q) * sin  # sin has its first half negated (_rope)
        k = k * cos + swap_halves(k) * sin
        if cache is not None:
            # The cache already holds this stream's prefix in its first slots.
            k, v = cache.update(layer_idx, k, v)
        elif self.has_prefix:
            b = n // self.parscale_n
            k = torch.cat([self.prefix_k.to(k.dtype).repeat_interleave(b, dim=0), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).repeat_interleave(b, dim=0), v], dim=2)
        out = self.core_attention(q, k, v, plan)
        return out.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim)

    def core_attention(self, q, k, v, plan: AttentionPlan) -> torch.Tensor:
        """softmax(q k^T) v over the keys the plan lets each query see (a kernel may take it: inference/)."""
        return _attend(q, k, v, plan)


class AttentionPlan:
    """How every layer of one forward pass attends: the zero-query causal trick or an explicit mask.

    mask: None, or bool [rows, 1, T, K] (True = may attend), rows 1 or P·B.
    n_zero_queries: queries to prepend for the square causal call (the prefix length), or None.
    """

    def __init__(self, mask: torch.Tensor | None, n_zero_queries: int | None, is_causal: bool,
                 grouped_decode: bool = False):
        self.mask, self.n_zero_queries, self.is_causal = mask, n_zero_queries, is_causal
        self.grouped_decode = grouped_decode
        # The slots a decode query may not see, inverted once per forward rather than in every layer.
        self.blocked = ~mask if grouped_decode else None


def _attend(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if plan.grouped_decode:
        return _grouped_decode_attention(q, k, v, plan.blocked)
    if plan.n_zero_queries:
        pad = q.new_zeros(q.shape[0], q.shape[1], plan.n_zero_queries, q.shape[3])
        out = F.scaled_dot_product_attention(torch.cat([pad, q], dim=2), k, v, is_causal=True, enable_gqa=gqa)
        return out[:, :, plan.n_zero_queries :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, is_causal=plan.is_causal, enable_gqa=gqa)


def _grouped_decode_attention(q, k, v, blocked):
    """One query per row against a fixed-size cache: the query heads of a KV head are batched
    together, so K and V are never expanded for GQA; two matmuls and a softmax in fp32. blocked: bool
    [rows, 1, 1, K], True where a slot is hidden."""
    n, h, t, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(n, kv, (h // kv) * t, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * (d**-0.5)
    scores = scores.masked_fill(blocked, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return out.reshape(n, h, t, d)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # one matmul for the two (inference/fuse.py)
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, plan, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, decoder layers, final norm and the stream aggregator (the checkpoints' `model.`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.parscale_n > 1:
            p, h = config.parscale_n, config.hidden_size
            self.aggregate_layer = nn.Sequential(nn.Linear(p * h, h), nn.SiLU(), nn.Linear(h, p))
        self.register_buffer("rope_inv_freq", rope_inv_freq(config), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # `.to(bfloat16)` would round the RoPE frequencies (a 0.7 rad phase error at position 4000): they
        # follow the device only and are recomputed in fp32 from the config.
        super()._apply(fn, *args, **kwargs)
        self.rope_inv_freq = rope_inv_freq(self.config).to(self.rope_inv_freq.device)
        return self


class ParScaleForCausalLM(nn.Module):
    """A causal LM with P parallel streams. `model(input_ids, attention_mask)` → logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict, device=None) -> ParScaleForCausalLM:
        """A model whose parameters are the given tensors (no copy, no random init); strict."""
        with torch.device("meta"):
            model = cls(config)
        state = dict(state)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rope_inv_freq = rope_inv_freq(config).to(device or state["model.embed_tokens.weight"].device)
        return model

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> ParScaleForCausalLM:
        """Set every parameter explicitly (see the module docstring for the scheme).

        Seeds are paired across P: the backbone (embedding, layers, norms, an untied LM head) is drawn
        from a generator seeded with `seed` alone, in a fixed order that never visits a ParScale
        parameter, and prefixes and aggregator from a second generator derived from `seed`. So seed s
        gives the same backbone for P = 1, the P = 1 prefix control and every P > 1.
        """
        seed = 0 if seed is None else seed
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range

        def normal_(t, s):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(s).to(t.dtype))

        seen = set()
        for name, module in self.named_modules():
            if name.startswith("model.aggregate_layer"):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) in seen:  # the tied LM head is the embedding: drawn once
                    continue
                seen.add(id(module.weight))
                normal_(module.weight, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.init_parscale_parameters(parscale_generator(seed))
        self.model.rope_inv_freq.copy_(rope_inv_freq(self.config))
        return self

    @torch.no_grad()
    def init_parscale_parameters(self, gen: torch.Generator | None = None) -> None:
        """(Re)initialise prefixes and aggregator only: used when adding streams to a trained model."""
        if not self.config.has_prefix:
            return
        gen = gen or parscale_generator(0)
        h = self.config.hidden_size
        for layer in self.model.layers:
            attn = layer.self_attn
            for prefix, name in ((attn.prefix_k, "k"), (attn.prefix_v, "v")):
                sigma = attn.projection_weight(name).float().std().item() * math.sqrt(h)
                prefix.copy_((torch.randn(prefix.shape, generator=gen) * sigma).to(prefix.dtype))
        if self.config.parscale_n == 1:
            return
        agg = self.model.aggregate_layer
        agg[0].weight.copy_((torch.randn(agg[0].weight.shape, generator=gen) * self.config.initializer_range)
                            .to(agg[0].weight.dtype))
        agg[0].bias.zero_()
        agg[2].weight.zero_()
        agg[2].bias.zero_()

    # ------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int):
        """The model's own decode cache (cache.StaticKVCache) for batch_size rows and >= max_len tokens.

        Reused while it fits: it only grows (lengths rounded up to a multiple of 256, so prompts of any
        length share one cache and one captured decode graph) and is made anew when the batch size, the
        model's dtype or its device changed. Its prefix slots are rewritten from the live parameters
        at every `reset`, so it never holds stale prefixes. `release_cache()` frees it.
        """
        from parscale.inference.cache import StaticKVCache

        ref = self.model.embed_tokens.weight
        cache = self.__dict__.get("_decode_cache")
        if cache is None or not cache.fits(batch_size, max_len, ref.dtype, ref.device):
            size = -(-max_len // 256) * 256
            if cache is not None and cache.batch_size == batch_size:
                size = max(size, cache.max_len)
            self.__dict__["_decode_cache"] = None  # free the old buffers before allocating the new ones
            cache = StaticKVCache.for_model(self, batch_size, size)
            self.__dict__["_decode_cache"] = cache
        return cache

    def release_cache(self) -> None:
        self.__dict__.pop("_decode_cache", None)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        hidden, _ = self.forward_hidden(input_ids, attention_mask, position_ids, cache)
        return self.lm_head(hidden)

    def last_logits(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Logits of the last position only [B, vocab]: what generation needs after a prompt. The LM head over
        every prompt position would be a [B, T, vocab] tensor (155 MB for 512 tokens of a 151,936-entry
        vocabulary in bf16) that is dropped at once.

        With an attention_mask the last *real* token of each row is taken, so a right-padded batch (the
        Hugging Face tokenizers' default side) gives each row's own next-token logits, as a left-padded one
        does; a row with no real token among input_ids is an error."""
        hidden, _ = self.forward_hidden(input_ids, attention_mask, position_ids, cache)
        if attention_mask is None:
            return self.lm_head(hidden[:, -1])
        real = attention_mask[:, -input_ids.shape[1]:].bool()
        checkable = not torch.compiler.is_compiling() and not (
            real.is_cuda and torch.cuda.is_current_stream_capturing())  # the check reads the GPU: eager only
        if checkable and not bool(real.any(dim=1).all()):
            raise ValueError("attention_mask has a row with no real token (all 0) among input_ids: nothing to "
                             "predict from")
        last = input_ids.shape[1] - 1 - real.flip(1).int().argmax(dim=1)  # index of each row's last 1
        return self.lm_head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def forward_hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Aggregated final hidden states [B, T, H] and the stream weights [B, T, P] (None if P = 1)."""
        streams = self.forward_streams(input_ids, attention_mask, position_ids, cache)
        if self.config.parscale_n == 1:
            return streams[0], None
        return self.aggregate(streams)

    def forward_streams(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Every stream's final-normed hidden states [P, B, T, H], before aggregation.

        attention_mask: [B, past + T] with 1 for real tokens and 0 for (left) padding, covering the
        cached past as well as the new tokens (Hugging Face convention). position_ids default to
        the count of real tokens before each position, so a left-padded row sees the same
        positions as the unpadded one.
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise ValueError(
                f"attention_mask must have shape {(b, past + t)} (batch, cached + new tokens), "
                f"got {tuple(attention_mask.shape)}"
            )
        p = cfg.parscale_n
        static_decode = cache is not None and getattr(cache, "decoding", False)
        if static_decode and (t != 1 or position_ids is None or attention_mask is not None):
            raise ValueError("a decoding StaticKVCache takes one token per row, explicit position_ids "
                             "and no attention_mask (its key_valid holds the padding)")
        if not static_decode and past + t > cfg.max_position_embeddings:
            raise ValueError(f"{past + t} positions (cached {past} + new {t}) exceed the model's "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        if position_ids is None:
            position_ids = _default_positions(attention_mask, b, past, t, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(position_ids, x.dtype)
        if static_decode:
            plan = AttentionPlan(cache.decode_mask(p), None, is_causal=False, grouped_decode=True)
        else:
            # A cache in masked prefill (the engine's captured prefill) takes the mask as it is, with no host
            # check of whether it pads anything: a check would wait for the device, which a capture forbids.
            plan = self._plan(attention_mask, b, past, t, x.device, getattr(cache, "masked_prefill", False))
        if p > 1:
            # Stream-major copies: row p·B + b.
            x = x.repeat(p, 1, 1)
            cos, sin = cos.repeat(p, 1, 1, 1), sin.repeat(p, 1, 1, 1)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, plan, cache, i)
        if cache is not None:
            cache.advance(t)
        x = self.model.norm(x)
        return x.view(p, b, t, x.shape[-1])

    def aggregate(self, streams: torch.Tensor):
        """Mix stream hidden states [P, B, T, H] into [B, T, H]; also return the weights [B, T, P]."""
        p, b, t, h = streams.shape
        eps = self.config.parscale_attn_smooth
        interleaved = streams.permute(1, 2, 3, 0).reshape(b, t, h * p)  # feature h·P + p
        weights = torch.softmax(self.model.aggregate_layer(interleaved).float(), dim=-1)  # [B, T, P]
        if eps != 0.0:
            weights = weights * (1 - eps) + eps / p
        mixed = (streams.permute(1, 2, 0, 3) * weights.unsqueeze(-1)).sum(dim=2).to(streams.dtype)
        return mixed, weights

    def _rope(self, position_ids, dtype):
        """cos and the sign-folded sin [B, 1, T, D] for every layer: sin's first half is negated, so that
        x·cos + swap_halves(x)·sin is RoPE's x·cos + rotate_half(x)·sin."""
        inv = self.model.rope_inv_freq
        freqs = position_ids.to(torch.float32)[..., None] * inv.to(torch.float32)  # [B, T, D/2]
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat([cos, cos], dim=-1)[:, None].to(dtype),
                torch.cat([-sin, sin], dim=-1)[:, None].to(dtype))

    def _plan(self, attention_mask, b, past, t, device, always_mask: bool = False) -> AttentionPlan:
        """Decide the attention route of this forward pass (see the module docstring)."""
        prefix = self.config.prefix_len
        padded = attention_mask is not None and (always_mask or not bool(attention_mask.all()))
        if not padded and past == 0:
            if prefix == 0:
                return AttentionPlan(None, None, is_causal=t > 1)
            return AttentionPlan(None, prefix if t > 1 else None, is_causal=False)
        if not padded and t == 1:
            return AttentionPlan(None, None, is_causal=False)  # one query sees every cached key
        key_ok = (attention_mask.bool() if attention_mask is not None
                  else torch.ones(b, past + t, dtype=torch.bool, device=device))
        q_idx = torch.arange(past, past + t, device=device)[:, None]
        k_idx = torch.arange(past + t, device=device)[None, :]
        real = (k_idx <= q_idx)[None] & key_ok[:, None, :]  # [B, T, past+T]
        real = real | (k_idx == q_idx)[None]  # a query always sees itself: no empty rows
        mask = torch.cat([real.new_ones(b, t, prefix), real], dim=-1)[:, None]
        if self.config.parscale_n > 1:
            mask = mask.repeat(self.config.parscale_n, 1, 1, 1)
        return AttentionPlan(mask, None, is_causal=False)


def parscale_generator(seed: int) -> torch.Generator:
    """The generator of a model's ParScale parameters: derived from its seed, apart from the backbone's."""
    return torch.Generator(device="cpu").manual_seed((seed * 0x9E3779B1 + 0x5EED) % (1 << 63))


def _default_positions(attention_mask, b, past, t, device):
    if attention_mask is None:
        return torch.arange(past, past + t, device=device).expand(b, t)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, past:]


def build_model(config: ModelConfig, seed: int = 0, dtype=None, device=None) -> ParScaleForCausalLM:
    """A new model with every parameter initialised explicitly."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    model = ParScaleForCausalLM(config).init_weights(seed)
    return model.to(device=device, dtype=dtype)
