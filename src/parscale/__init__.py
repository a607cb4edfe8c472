"""parscale: parallel scaling (ParScale, arXiv 2505.10475) for decoder-only language models.

    import parscale
    model = parscale.load("path/to/checkpoint", dtype="bfloat16", device="cuda")  # or a Hub id org/name
    logits = model(input_ids, attention_mask=None)               # [B, T, vocab]
    new_ids = parscale.generate(model, input_ids, max_new_tokens=32)

The names below are imported on first use, so that commands needing no model (`parscale fit`, `predict`,
`plan`, `cost`) start without loading torch.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "KVCache": "parscale.inference.cache", "apply_chat_template": "parscale.inference.chat",
    "generate": "parscale.inference.generate", "CheckpointError": "parscale.model.checkpoint",
    "load": "parscale.model.checkpoint", "load_tokenizer": "parscale.model.checkpoint",
    "save": "parscale.model.checkpoint", "ModelConfig": "parscale.model.config",
    "ParScaleForCausalLM": "parscale.model.transformer", "build_model": "parscale.model.transformer",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'parscale' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "ParScaleForCausalLM", "apply_chat_template", "build_model",
    "generate", "load",
    "load_tokenizer", "save", "__version__",
]
