"""The vLLM plugin: `pip install "parscale[vllm]"`, then `vllm serve DIR` runs a qwen2_parscale folder.

vLLM calls `register()` in every one of its processes (entry point group `vllm.general_plugins`). It
registers, without `trust_remote_code`:
- the `qwen2_parscale` configuration class with transformers' AutoConfig (vllm_model.Qwen2ParScaleConfig);
- the architecture `Qwen2ParScaleForCausalLM` (vllm_model.py, imported lazily by vLLM);
- a renderer for the default tokenizer mode that puts the prefix's placeholder tokens in front of every
  prompt of a ParScale model (vllm_model.py explains why) and behaves exactly as vLLM's own for every
  other model.
"""

from __future__ import annotations


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from parscale.serving.vllm_model import Qwen2ParScaleConfig

    try:
        AutoConfig.register("qwen2_parscale", Qwen2ParScaleConfig)
    except ValueError:  # registered already in this process
        pass
    if "Qwen2ParScaleForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("Qwen2ParScaleForCausalLM",
                                     "parscale.serving.vllm_model:Qwen2ParScaleForCausalLM")
    from vllm.renderers.registry import RENDERER_REGISTRY

    if RENDERER_REGISTRY.renderers.get("hf") != ("parscale.serving.vllm_renderer", "PrefixPlaceholderRenderer"):
        RENDERER_REGISTRY.renderers["hf"] = ("parscale.serving.vllm_renderer", "PrefixPlaceholderRenderer")
