"""parscale: parallel scaling (ParScale, arXiv 2505.10475) for decoder-only language models.

    import parscale
    model = parscale.load("path/to/checkpoint", dtype="bfloat16", device="cuda")  # or a Hub id org/name
    logits = model(input_ids, attention_mask=None)               # [B, T, vocab]
    new_ids = parscale.generate(model, input_ids, max_new_tokens=32)
"""

from parscale.inference.cache import KVCache
from parscale.inference.chat import apply_chat_template
from parscale.inference.generate import generate
from parscale.model.checkpoint import CheckpointError, load, load_tokenizer, save
from parscale.model.config import ModelConfig
from parscale.model.transformer import ParScaleForCausalLM, build_model

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "KVCache", "ModelConfig", "ParScaleForCausalLM", "apply_chat_template", "build_model",
    "generate", "load",
    "load_tokenizer", "save", "__version__",
]
