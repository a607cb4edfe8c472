"""Memory of a model's weights and of its KV cache, from the config alone (bytes).

The KV cache holds, per layer and per stream, the n_tokens prefix slots plus one slot per token:
2 (K and V) · layers · P·batch · kv_heads · (prefix + length) · head_dim · bytes.
"""

from __future__ import annotations

from parscale.model.config import ModelConfig


def weight_bytes(config: ModelConfig, bytes_per_param: int = 2) -> int:
    return config.param_counts()["total"] * bytes_per_param


def kv_cache_bytes(config: ModelConfig, batch: int, length: int, bytes_per_elem: int = 2) -> int:
    slots = config.prefix_len + length
    return (2 * config.num_hidden_layers * config.parscale_n * batch * config.num_key_value_heads * slots
            * config.head_dim * bytes_per_elem)
