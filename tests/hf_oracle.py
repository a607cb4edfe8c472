"""Tiny random Hugging Face models (transformers) saved to folders, used as oracles in tests."""

from __future__ import annotations

import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    "qwen2": dict(cls="Qwen2", tie_word_embeddings=True, rope_theta=10000.0),
    "llama": dict(cls="Llama", tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear": dict(cls="Llama", tie_word_embeddings=True, rope_theta=10000.0,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3": dict(cls="Qwen3", tie_word_embeddings=True, rope_theta=1000000.0, head_dim=24),
}


def make_hf_model(variant: str, folder, seed: int = 0):
    """Build, randomise (non-trivially: norms and biases too) and save a tiny HF model; return it."""
    import transformers

    spec = dict(VARIANTS[variant])
    cls = spec.pop("cls")
    kwargs = {**TINY, **spec}
    rope_scaling = kwargs.pop("rope_scaling", None)
    rope = {"rope_theta": kwargs.pop("rope_theta"), "rope_type": "default"}
    if rope_scaling:
        rope.update(rope_scaling)
    config = getattr(transformers, f"{cls}Config")(**kwargs, rope_parameters=rope)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(folder)
    return model
