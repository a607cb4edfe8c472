"""One typed configuration for a decoder-only transformer with parallel scaling (ParScale).

`ModelConfig` describes the backbone (Qwen2 / Llama / Qwen3 families) and the ParScale fields
(`parscale_n` streams, `parscale_n_tokens` prefix tokens per stream and layer, smoothing ε).
It converts to and from the Hugging Face `config.json` of each supported `model_type`, has named
presets (the paper's six sizes and tiny test sizes) and counts parameters the way the paper does.

Usage:
    cfg = ModelConfig.preset("paper-1.6b", parscale_n=8)
    cfg.param_counts()   # {'total': ..., 'non_embedding': ..., 'parscale': ...}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Families whose checkpoints can be read and written. The `_parscale` types other than the
# released `qwen2_parscale` are this library's extension: the same backbone keys as the family,
# plus the released ParScale keys (prefix_k/prefix_v, aggregate_layer).
FAMILIES = ("qwen2", "llama", "qwen3")
MODEL_TYPES = FAMILIES + tuple(f"{f}_parscale" for f in FAMILIES)
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Shape and behaviour of one model. Field names follow Hugging Face `config.json` keys."""

    family: str = "qwen2"
    """Backbone family: 'qwen2' (q/k/v bias), 'llama' (no bias), 'qwen3' (q/k RMSNorm per head)."""
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None
    """Per-head width; None means hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None, or {'rope_type': 'linear'|'llama3', ...} as in Hugging Face configs."""
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool | None = None
    """Bias on q/k/v projections; None means the family default (True for qwen2 only)."""
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    parscale_n: int = 1
    """P, the number of parallel streams. 1 is exactly the plain model."""
    parscale_n_tokens: int = 48
    """Prefix tokens per stream in every attention layer."""
    parscale_attn_smooth: float = 0.1
    """ε of the aggregation smoothing w·(1−ε) + ε/P (the paper and released checkpoints use 0.1)."""
    parscale_p1_prefix: bool = False
    """P = 1 with a learned prefix of parscale_n_tokens in every layer and no aggregator: the control that
    separates the prefix's own effect from parallel computation (this library's extension)."""
    extra: dict = field(default_factory=dict, repr=False)
    """Other keys of the source config.json, written back unchanged on save."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.family == "qwen2"
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.parscale_n < 1:
            raise ValueError(f"parscale_n must be >= 1, got {self.parscale_n}")
        if self.parscale_n > 1 and self.parscale_n_tokens < 1:
            raise ValueError(f"parscale_n_tokens must be >= 1 when parscale_n > 1, got {self.parscale_n_tokens}")
        if self.parscale_p1_prefix and self.parscale_n != 1:
            raise ValueError("parscale_p1_prefix is the P = 1 control; it needs parscale_n = 1")
        if self.parscale_p1_prefix and self.parscale_n_tokens < 1:
            raise ValueError(f"parscale_p1_prefix needs parscale_n_tokens >= 1, got {self.parscale_n_tokens}")
        if not 0.0 <= self.parscale_attn_smooth <= 1.0:
            raise ValueError(f"parscale_attn_smooth must be in [0, 1], got {self.parscale_attn_smooth}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_SCALING:
                raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {SUPPORTED_ROPE_SCALING}")

    # ----------------------------------------------------------------------------------------
    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises every query and key head with its own RMSNorm before RoPE."""
        return self.family == "qwen3"

    @property
    def has_prefix(self) -> bool:
        """Every attention layer has learned prefix keys/values (P > 1, or the P = 1 prefix control)."""
        return self.parscale_n > 1 or self.parscale_p1_prefix

    @property
    def prefix_len(self) -> int:
        """Cache slots taken by the prefix in every stream (0 for a plain P = 1 model)."""
        return self.parscale_n_tokens if self.has_prefix else 0

    @property
    def model_type(self) -> str:
        return f"{self.family}_parscale" if self.has_prefix else self.family

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, non-embedding (the paper's N, ParScale parameters included),
        embedding (input embedding plus an untied LM head), and those ParScale adds."""
        h, kv, hd, n_heads = self.hidden_size, self.num_key_value_heads, self.head_dim, self.num_attention_heads
        q_out, kv_out = n_heads * hd, kv * hd
        attn = h * q_out + 2 * h * kv_out + q_out * h
        if self.attention_bias:
            attn += q_out + 2 * kv_out
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        backbone = self.num_hidden_layers * layer + h  # + final norm
        p = self.parscale_n
        parscale = self.num_hidden_layers * 2 * p * kv * self.prefix_len * hd  # prefixes
        if p > 1:
            parscale += (p * h * h + h) + (h * p + p)  # aggregator
        embedding = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        non_embedding = backbone + parscale
        return {
            "total": non_embedding + embedding,
            "non_embedding": non_embedding,
            "embedding": embedding,
            "parscale": parscale,
        }

    # ----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dictionary (model_type must be supported).

        Keys the dictionary lacks take the defaults of the family's own configuration class
        (HF_FAMILY_DEFAULTS), not this class's field defaults, which serve presets."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of settings, got a JSON {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r} in config.json; supported: {', '.join(MODEL_TYPES)}")
        family = model_type.removesuffix("_parscale")
        if d.get("use_sliding_window"):
            raise ValueError("config.json enables use_sliding_window, which parscale does not implement")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"family", "extra"}
        kwargs = {k: d[k] for k in known if k in d and d[k] is not None}
        # Released configs carry parscale_n; a plain model is P = 1 whatever its config says.
        if not model_type.endswith("_parscale"):
            for k in ("parscale_n", "parscale_n_tokens", "parscale_attn_smooth", "parscale_p1_prefix"):
                kwargs.pop(k, None)
        rope_params = d.get("rope_parameters")  # newer transformers spelling
        if "rope_theta" not in kwargs and isinstance(rope_params, dict) and "rope_theta" in rope_params:
            kwargs["rope_theta"] = rope_params["rope_theta"]
        if "rope_scaling" not in kwargs and isinstance(rope_params, dict):
            if rope_params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        check_config_types(kwargs)
        # A key the file lacks takes the default of the family's own configuration class, so a folder
        # loads here as it loads in transformers (or the official ParScale code): e.g. a missing
        # tie_word_embeddings means untied (reading it as tied would silently drop lm_head.weight).
        kwargs = {**family_defaults(model_type, kwargs), **kwargs}
        extra = {k: v for k, v in d.items() if k not in known and k != "model_type"}
        return cls(family=family, extra=extra, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json written next to the weights (same keys as the released checkpoints)."""
        out = dict(self.extra)
        out.pop("architectures", None)
        arch = {"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3"}[self.family]
        out["architectures"] = [f"{arch}ParScaleForCausalLM" if self.has_prefix else f"{arch}ForCausalLM"]
        out["model_type"] = self.model_type
        for f in dataclasses.fields(self):
            if f.name in ("family", "extra"):
                continue
            value = getattr(self, f.name)
            if f.name.startswith("parscale_") and not self.has_prefix:
                continue
            if f.name == "parscale_p1_prefix" and not value:
                continue  # the released format has no such key
            if value is None and f.name in ("bos_token_id", "eos_token_id", "rope_scaling"):
                if f.name == "rope_scaling":
                    out[f.name] = None
                continue
            out[f.name] = value
        out.setdefault("hidden_act", "silu")
        if "rope_parameters" in out:  # keep the newer transformers spelling consistent with ours
            out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default",
                                      **(self.rope_scaling or {})}
        if self.family == "qwen2":
            out.pop("attention_bias", None)  # Qwen2 always has q/k/v bias; its config has no such key
            out.setdefault("use_sliding_window", False)
        return dict(sorted(out.items()))


# The defaults of each family's configuration class (transformers' Qwen2Config, LlamaConfig, Qwen3Config
# and the official Qwen2ParScaleConfig), used for keys a config.json lacks.
_HF_COMMON = dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02)
HF_FAMILY_DEFAULTS: dict[str, dict] = {
    "qwen2": dict(_HF_COMMON, vocab_size=151936, max_position_embeddings=32768),
    "llama": dict(_HF_COMMON, vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048,
                  attention_bias=False, bos_token_id=1, eos_token_id=2),
    "qwen3": dict(_HF_COMMON, vocab_size=151936, max_position_embeddings=32768, head_dim=128, attention_bias=False),
}
# The official Qwen2ParScaleConfig; this library's llama_parscale / qwen3_parscale follow it.
HF_PARSCALE_DEFAULTS = dict(parscale_n=1, parscale_n_tokens=48, parscale_attn_smooth=0.01)

_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "parscale_n", "parscale_n_tokens")
_POSITIVE_FIELDS = tuple(f for f in _INT_FIELDS if f != "parscale_n_tokens")
_FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "parscale_attn_smooth", "initializer_range")
_BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "parscale_p1_prefix")


def family_defaults(model_type: str, given: dict) -> dict:
    """The values a config.json of this model_type means by leaving a key out (see HF_FAMILY_DEFAULTS)."""
    family = model_type.removesuffix("_parscale")
    out = dict(HF_FAMILY_DEFAULTS[family])
    if model_type.endswith("_parscale"):
        out.update(HF_PARSCALE_DEFAULTS)
    # Qwen2Config, Qwen3Config and Qwen2ParScaleConfig default to 32 KV heads; LlamaConfig to one per head.
    heads = given.get("num_attention_heads", out["num_attention_heads"])
    out["num_key_value_heads"] = heads if family == "llama" else 32
    return out


def check_config_types(values: dict) -> None:
    """One error naming the first key whose value has the wrong type or range (sizes as strings, 0 heads)."""
    for k in _INT_FIELDS:
        if k in values and (isinstance(values[k], bool) or not isinstance(values[k], int)):
            raise ValueError(f"{k} must be an integer, got {values[k]!r}")
    for k in _POSITIVE_FIELDS:
        if k in values and values[k] < 1:
            raise ValueError(f"{k} must be >= 1, got {values[k]}")
    if values.get("parscale_n_tokens", 0) < 0:
        raise ValueError(f"parscale_n_tokens must be >= 0, got {values['parscale_n_tokens']}")
    for k in _FLOAT_FIELDS:
        if k in values and (isinstance(values[k], bool) or not isinstance(values[k], (int, float))):
            raise ValueError(f"{k} must be a number, got {values[k]!r}")
    for k in _BOOL_FIELDS:
        if k in values and not isinstance(values[k], bool):
            raise ValueError(f"{k} must be true or false, got {values[k]!r}")
    for k in ("rope_theta", "rms_norm_eps"):
        if k in values and not values[k] > 0:
            raise ValueError(f"{k} must be > 0, got {values[k]}")
    if "rope_scaling" in values and not isinstance(values["rope_scaling"], dict):
        raise ValueError(f"rope_scaling must be an object or null, got {values['rope_scaling']!r}")
    for k in ("bos_token_id", "eos_token_id"):
        v = values.get(k)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"{k} must be a token id or a list of them, got {v!r}")


def _paper(hidden: int, intermediate: int) -> dict:
    return dict(
        family="qwen2", vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
        rope_theta=10000.0, max_position_embeddings=2048, rms_norm_eps=1e-6,
    )


PRESETS: dict[str, dict] = {
    # The paper's six sizes (names are non-embedding parameters at P = 1; paper.md §3).
    "paper-0.5b": _paper(896, 4864),
    "paper-0.7b": _paper(1024, 5504),
    "paper-1.1b": _paper(1280, 6912),
    "paper-1.6b": _paper(1536, 8320),
    "paper-2.8b": _paper(2048, 11008),
    "paper-4.4b": _paper(2560, 13824),
    # SmolLM2-135M(-Instruct)'s shape (Llama, GQA 9 / 3), for benchmarks of the recycled model (docs/formats.md).
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, parscale_n_tokens=16),
    # Tiny sizes for tests and the CPU demo.
    "tiny": dict(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, parscale_n_tokens=8),
    "tiny-llama": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False, parscale_n_tokens=8),
    "tiny-qwen3": dict(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                       parscale_n_tokens=8),
    "demo": dict(family="qwen2", vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, parscale_n_tokens=8),
    # GPT-2-small-like width and depth (113M non-embedding parameters), for training-speed measurements.
    "125m": dict(family="qwen2", vocab_size=4096, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048, parscale_n_tokens=48),
    "small": dict(family="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, parscale_n_tokens=16),
}
