"""vLLM's HF renderer, plus the prefix's placeholder tokens in front of every prompt of a ParScale model.

For a model whose config has a prefix (parscale_n > 1, or the P = 1 prefix control), every tokenized
prompt (text, token ids or a rendered chat) starts with `placeholder_count(config)` copies of
`placeholder_id(config)`; their cache slots receive the prefix (vllm_model.py). For every other model
this is vLLM's own HfRenderer, unchanged.
"""

from __future__ import annotations

from vllm.renderers.hf import HfRenderer

from parscale.serving.vllm_config import placeholder_count, placeholder_id


class PrefixPlaceholderRenderer(HfRenderer):
    def __init__(self, config, tokenizer) -> None:
        super().__init__(config, tokenizer)
        hf_config = config.model_config.hf_config
        self._placeholders = [placeholder_id(hf_config)] * placeholder_count(hf_config)

    def _with_placeholders(self, prompt):
        if not self._placeholders or not isinstance(prompt, dict):
            return prompt
        if "prompt_token_ids" not in prompt:
            # Without the placeholders the prefix would overwrite the first real positions: refuse.
            raise ValueError("a ParScale model takes text or token-id prompts; prompt embeddings are not supported")
        prompt["prompt_token_ids"] = self._placeholders + list(prompt["prompt_token_ids"])
        return prompt

    def tokenize_prompt(self, prompt, params):
        return self._with_placeholders(super().tokenize_prompt(prompt, params))

    async def tokenize_prompt_async(self, prompt, params):
        return self._with_placeholders(await super().tokenize_prompt_async(prompt, params))
