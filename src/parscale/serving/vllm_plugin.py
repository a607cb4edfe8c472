"""The vLLM plugin: `pip install "parscale[vllm]"`, then `vllm serve DIR` runs a qwen2_parscale folder.

vLLM calls `register()` in every one of its processes (entry point group `vllm.general_plugins`). It
registers, without `trust_remote_code`:
- the `qwen2_parscale` configuration class (and this library's `llama_parscale` / `qwen3_parscale`) with
  transformers' AutoConfig (vllm_config.py);
- the architectures `Qwen2ParScaleForCausalLM`, `LlamaParScaleForCausalLM`, `Qwen3ParScaleForCausalLM`
  (vllm_model.py, imported lazily by vLLM);
- the wrappers that put the prefix's placeholder tokens in front of every prompt of a ParScale model at the
  engine's door and keep them out of everything read back (vllm_placeholders.py); every other model is
  served exactly as vLLM serves it.
"""

from __future__ import annotations


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from parscale.serving.vllm_config import CONFIGS

    for model_type, config_class in CONFIGS.items():
        try:
            AutoConfig.register(model_type, config_class)
        except ValueError:  # registered already in this process
            pass
    for family in ("Qwen2", "Llama", "Qwen3"):
        arch = f"{family}ParScaleForCausalLM"
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"parscale.serving.vllm_model:{arch}")
    from parscale.serving.vllm_placeholders import install

    install()
