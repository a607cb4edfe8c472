"""Configuration classes of the ParScale model types for transformers' AutoConfig inside vLLM.

Light on purpose (transformers only): vLLM's plugin loader imports this in every process before any model
code runs.
"""

from __future__ import annotations

from transformers import LlamaConfig, Qwen2Config, Qwen3Config


class _ParScaleKeys:
    """The official Qwen2ParScaleConfig's keys (and defaults) on top of a family's transformers config."""

    def __init__(self, parscale_n: int = 1, parscale_n_tokens: int = 48, parscale_attn_smooth: float = 0.01,
                 parscale_p1_prefix: bool = False, tie_word_embeddings: bool = False, **kwargs):
        self.parscale_n = parscale_n
        self.parscale_n_tokens = parscale_n_tokens
        self.parscale_attn_smooth = parscale_attn_smooth
        self.parscale_p1_prefix = parscale_p1_prefix
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class Qwen2ParScaleConfig(_ParScaleKeys, Qwen2Config):
    model_type = "qwen2_parscale"


class LlamaParScaleConfig(_ParScaleKeys, LlamaConfig):
    model_type = "llama_parscale"  # this library's extension: Llama's keys plus the ParScale keys


class Qwen3ParScaleConfig(_ParScaleKeys, Qwen3Config):
    model_type = "qwen3_parscale"  # this library's extension: Qwen3's keys plus the ParScale keys


CONFIGS = {c.model_type: c for c in (Qwen2ParScaleConfig, LlamaParScaleConfig, Qwen3ParScaleConfig)}


def placeholder_count(hf_config) -> int:
    if not str(getattr(hf_config, "model_type", "")).endswith("_parscale"):
        return 0
    has_prefix = getattr(hf_config, "parscale_n", 1) > 1 or getattr(hf_config, "parscale_p1_prefix", False)
    return int(hf_config.parscale_n_tokens) if has_prefix else 0


def placeholder_id(hf_config) -> int:
    """The last id of the vocabulary: a padding row in the released checkpoints (151,936 rows for 151,646
    tokens); its embedding never matters, since the placeholders' keys and values are replaced."""
    return int(hf_config.vocab_size) - 1
