"""Serving ParScale checkpoints on other engines (vLLM: vllm_plugin.py registers vllm_model.py)."""
