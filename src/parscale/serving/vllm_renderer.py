"""vLLM's HF renderer, plus the prefix's placeholder tokens in front of every prompt of a ParScale model.

For a model whose config has a prefix (parscale_n > 1, or the P = 1 prefix control), every tokenized
prompt (text, token ids or a rendered chat) starts with `placeholder_count(config)` copies of
`placeholder_id(config)`; their cache slots receive the prefix (vllm_model.py). For every other model
this is vLLM's own HfRenderer, unchanged.
"""

from __future__ import annotations

from vllm.renderers.hf import HfRenderer


def placeholder_count(hf_config) -> int:
    if getattr(hf_config, "model_type", None) != "qwen2_parscale":
        return 0
    has_prefix = getattr(hf_config, "parscale_n", 1) > 1 or getattr(hf_config, "parscale_p1_prefix", False)
    return int(hf_config.parscale_n_tokens) if has_prefix else 0


def placeholder_id(hf_config) -> int:
    """The last id of the vocabulary: a padding row in the released checkpoints (151,936 rows for 151,646
    tokens); its embedding never matters, since the placeholders' keys and values are replaced."""
    return int(hf_config.vocab_size) - 1


class PrefixPlaceholderRenderer(HfRenderer):
    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        hf_config = config.model_config.hf_config
        self._placeholders = [placeholder_id(hf_config)] * placeholder_count(hf_config)

    def _with_placeholders(self, prompt):
        if self._placeholders and isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            prompt["prompt_token_ids"] = self._placeholders + list(prompt["prompt_token_ids"])
        return prompt

    def tokenize_prompt(self, prompt, params):
        return self._with_placeholders(super().tokenize_prompt(prompt, params))

    async def tokenize_prompt_async(self, prompt, params):
        return self._with_placeholders(await super().tokenize_prompt_async(prompt, params))
