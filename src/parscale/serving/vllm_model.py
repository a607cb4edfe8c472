"""ParScale models for vLLM: the released qwen2_parscale checkpoints (and llama_ / qwen3_parscale) on vLLM's paged
attention.

Streams as attention heads. The MLPs, norms and projections run on T·P rows (token-major: row t·P + p);
attention then sees T tokens with P·H query heads and P·KVH key/value heads, head p·H + h for stream p,
so vLLM's grouped-query mapping (head j reads KV head j // (H / KVH)) keeps every stream on its own KV
heads, and vLLM's KV-cache accounting counts the P-fold cache by itself. After the final norm the
aggregator mixes each token's P hidden states exactly as parscale's model does.

The prefix, exactly. In the released model every layer's stream p attends first to n learned
key/value pairs that carry no RoPE, while the real tokens keep positions 0..T−1, so the score of a
query at t with a prefix key k is R(t)q·k. Here every prompt starts with n placeholder tokens
(vllm_placeholders.py) whose cache slots receive the prefix: the placeholders take positions 0..n−1, so a
real token t sits at t + n, and each prefix key is stored rotated to position n. Then
R(t+n)q·R(n)k = R(t)q·k for the prefix and R(t+n)q·R(s+n)k = R(t)q·R(s)k between real tokens: the
same scores as the released model. The placeholders' own outputs are never used (their logits are
not defined); identical placeholders at the start of every prompt share their cache blocks under
prefix caching, as they should, since their keys and values are the same constants.

Supported: qwen2_parscale (the released format) and this library's llama_parscale / qwen3_parscale; P ≥ 1,
any n_tokens, ε, tied or untied embeddings, prefix caching, chunked prefill, continuous batching. Refused
at load (refuse_unsupported): tensor and pipeline parallelism, quantization, LoRA, sliding windows, RoPE
types that are not a rotation linear in the position. Not supported: speculative decoding. Tested on vLLM's CPU
build against parscale's own model (tests_vllm/).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from parscale.model.config import SUPPORTED_ROPE_SCALING
from parscale.serving.vllm_config import placeholder_count, placeholder_id
from parscale.serving.vllm_placeholders import WORKER_PLACEHOLDERS


def refuse_unsupported(vllm_config: VllmConfig) -> None:
    """One error naming the setting this model cannot serve exactly, before any weight is read."""
    config = vllm_config.model_config.hf_config
    if get_tensor_model_parallel_world_size() > 1 or get_pp_group().world_size > 1:
        raise ValueError("the parscale vLLM model runs on one device: tensor and pipeline parallelism "
                         "are not supported yet")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("use_sliding_window is not supported")
    if vllm_config.quant_config is not None or getattr(vllm_config.model_config, "quantization", None):
        raise ValueError(f"quantization ({vllm_config.model_config.quantization}) is not supported by the parscale "
                         "vLLM model; serve the bf16 / fp32 folder (parscale's own engine has --quantize)")
    if vllm_config.lora_config is not None:
        raise ValueError("LoRA (enable_lora) is not supported by the parscale vLLM model")
    # The placeholders sit at positions 0..n-1 and the prefix keys are stored rotated to position n; that equals
    # parscale's unrotated prefix only for a RoPE that is a rotation linear in the position (vllm_model.py).
    for rope in _rope_parameter_sets(config):
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and kind not in SUPPORTED_ROPE_SCALING:
            raise ValueError(f"RoPE type {kind!r} is not supported by the parscale vLLM model (supported: default, "
                             f"{', '.join(SUPPORTED_ROPE_SCALING)}): its rotation is not linear in the position")


def _rope_parameter_sets(config) -> list[dict]:
    sets = []
    for key in ("rope_parameters", "rope_scaling"):
        value = getattr(config, key, None)
        if isinstance(value, dict):
            nested = [v for v in value.values() if isinstance(v, dict)]  # per-layer-type parameters
            sets.extend(nested or [value])
    return sets


class ParScaleMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(h, [f] * 2, bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(f, h, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x):
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class ParScaleAttention(nn.Module):
    def __init__(self, config, streams: int, n_prefix: int, cache_config, quant_config, prefix: str):
        super().__init__()
        h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = d = getattr(config, "head_dim", None) or h // heads
        self.streams, self.n_prefix = streams, n_prefix
        self.q_size, self.kv_size = heads * d, kv * d
        family = config.model_type.removesuffix("_parscale")
        bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))  # Qwen2 always has q/k/v bias
        self.qkv_proj = QKVParallelLinear(h, d, heads, kv, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.qk_norm = family == "qwen3"  # Qwen3 normalises every query and key head before RoPE
        if self.qk_norm:
            self.q_norm = RMSNorm(d, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.o_proj = RowParallelLinear(heads * d, h, bias=False, quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(d, max_position=config.max_position_embeddings + n_prefix,
                                   rope_parameters=config.rope_parameters)
        self.attn = Attention(streams * heads, d, d**-0.5, num_kv_heads=streams * kv, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")
        if n_prefix:
            self.prefix_k = nn.Parameter(torch.empty(streams, kv, n_prefix, d), requires_grad=False)
            self.prefix_v = nn.Parameter(torch.empty(streams, kv, n_prefix, d), requires_grad=False)
            # The cache slots of the placeholders: [n, P·KVH·d], keys rotated to position n (module docstring).
            self.register_buffer("slot_k", torch.empty(n_prefix, streams * kv * d), persistent=False)
            self.register_buffer("slot_v", torch.empty(n_prefix, streams * kv * d), persistent=False)
            self._slot_versions = (-1, -1)  # filled by prepare_prefix

    @torch.no_grad()
    def prepare_prefix(self) -> None:
        """Fill slot_k / slot_v from the loaded prefix (after load_weights, and again whenever the prefix
        parameters were changed in place: see forward)."""
        n = self.n_prefix
        self._slot_versions = (self.prefix_k._version, self.prefix_v._version)
        k = self.prefix_k.permute(2, 0, 1, 3).reshape(n, -1)  # [n, P·KVH·d], head p·KVH + h
        v = self.prefix_v.permute(2, 0, 1, 3).reshape(n, -1)
        positions = torch.full((n,), n, dtype=torch.long, device=k.device)
        _, k_rot = self.rotary_emb(positions, torch.zeros(n, self.head_dim, dtype=k.dtype, device=k.device),
                                   k.clone())
        self.slot_k.copy_(k_rot.reshape(n, -1))
        self.slot_v.copy_(v)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        t, p = positions.shape[0], self.streams
        qkv, _ = self.qkv_proj(hidden)  # [T·P, (H + 2·KVH)·d]
        q, k, v = qkv.view(t, p, -1).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim))
            k = self.k_norm(k.reshape(-1, self.head_dim))
        q, k, v = q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)  # [T, P·H·d], head p·H + h
        q, k = self.rotary_emb(positions, q, k)
        if self.n_prefix:
            # A weight update that bypasses load_weights (an in-place copy into the prefix, as RL weight sync or
            # LLM.apply_model may do) bumps the parameters' version counters: refresh the slots then. Inside a
            # torch.compile trace the check cannot run; there load_weights is the way to update.
            if not torch.compiler.is_compiling() and self._slot_versions != (self.prefix_k._version,
                                                                             self.prefix_v._version):
                self.prepare_prefix()
            is_slot = (positions < self.n_prefix)[:, None]
            index = positions.clamp(max=self.n_prefix - 1)
            k = torch.where(is_slot, self.slot_k[index].to(k.dtype), k)
            v = torch.where(is_slot, self.slot_v[index].to(v.dtype), v)
        out = self.attn(q, k, v)  # [T, P·H·d]
        out, _ = self.o_proj(out.reshape(t * p, self.q_size))
        return out


class ParScaleDecoderLayer(nn.Module):
    def __init__(self, config, streams, n_prefix, cache_config, quant_config, prefix: str):
        super().__init__()
        self.self_attn = ParScaleAttention(config, streams, n_prefix, cache_config, quant_config,
                                           f"{prefix}.self_attn")
        self.mlp = ParScaleMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, hidden, residual):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class ParScaleModel(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        refuse_unsupported(vllm_config)
        self.streams = int(getattr(config, "parscale_n", 1))
        self.n_prefix = placeholder_count(config)
        if self.n_prefix:  # the worker masks them out of the repetition penalty (vllm_placeholders.py)
            WORKER_PLACEHOLDERS.update(n=self.n_prefix, id=placeholder_id(config))
        self.smooth = float(getattr(config, "parscale_attn_smooth", 0.0))
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, quant_config=quant,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList([
            ParScaleDecoderLayer(config, self.streams, self.n_prefix, cache, quant, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.streams > 1:
            h, p = config.hidden_size, self.streams
            self.aggregate_layer = nn.Sequential(nn.Linear(p * h, h), nn.SiLU(), nn.Linear(h, p))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)  # [T, H]
        t, p = hidden.shape[0], self.streams
        hidden = hidden.repeat_interleave(p, dim=0) if p > 1 else hidden  # [T·P, H], row t·P + p
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        if p == 1:
            return hidden
        streams = hidden.view(t, p, -1)  # [T, P, H]
        weights = torch.softmax(self.aggregate_layer(streams.transpose(1, 2).reshape(t, -1)).float(), dim=-1)
        if self.smooth:
            weights = weights * (1 - self.smooth) + self.smooth / p
        return (streams * weights.unsqueeze(-1)).sum(dim=1).to(streams.dtype)  # [T, H], mixed in fp32


class ParScaleForCausalLM(nn.Module):
    """One class for qwen2_parscale (the released format) and this library's llama_parscale / qwen3_parscale."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
        ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)})
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ParScaleModel(vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["lm_head."] if self.config.tie_word_embeddings else []
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=skip)
        loaded = loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        for layer in self.model.layers:
            if layer.self_attn.n_prefix:
                layer.self_attn.prepare_prefix()
        return loaded


class Qwen2ParScaleForCausalLM(ParScaleForCausalLM):
    pass


class LlamaParScaleForCausalLM(ParScaleForCausalLM):
    pass


class Qwen3ParScaleForCausalLM(ParScaleForCausalLM):
    pass
