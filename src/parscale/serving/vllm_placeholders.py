"""The prefix's placeholder tokens: added at the engine's door, invisible in everything read back.

A ParScale model on vLLM keeps its prefix in the KV cache: every request starts with n placeholder tokens
whose cache slots receive the prefix (vllm_model.py). Only the engine may see them. `install()` (called by
the plugin in every vLLM process) wraps five places of vLLM 0.32:

- `InputProcessor.process_inputs` (front end, after vLLM's own validation): every prompt, whichever way it
  came (text, token ids, chat, `skip_tokenizer_init`, a batch of mixed kinds, beam search), is checked against
  the real tokens' limit and gets the placeholders in front; prompt embeddings and fixed-id prompt scores
  (`prompt_logprob_token_ids`) are refused with one error. The request carries n in
  `sampling_params.extra_args["parscale_placeholders"]`.
- `ModelConfig.get_and_verify_max_len`: the engine's `max_model_len` is the user's plus n, so that
  `max_model_len` counts real tokens, as it does for a plain model.
- `RequestState.from_new_request` and `LogprobsProcessor` (front end, outputs): `prompt_token_ids`, the
  prompt length of usage counts, echo and detokenisation see the real tokens only; the n prompt log-prob
  rows of the placeholders (and of the first real token, which a plain model cannot score) are dropped, so
  `prompt_logprobs` starts with None as a plain model's does; cached-token counts leave out the placeholders.
- `EngineCore.add_request` (engine): a request of a ParScale model whose first n ids are not the
  placeholders is refused loudly — its first n real tokens' keys and values would otherwise be replaced by
  the prefix without a word.
- `InputBatch._make_prompt_token_ids_cpu_tensor` (worker): the repetition penalty sees real prompt tokens
  only (the placeholder id is a real token in an exact-size vocabulary). Presence and frequency penalties
  count generated tokens only, in vLLM as in transformers.

- the OpenAI server's `/v1/models` and `/tokenize` answers: the `max_model_len` they report is the user's.

Every wrapper leaves a model without a prefix exactly as vLLM treats it. Not hidden: the engine's own token
counters in its metrics include the placeholders.
"""

from __future__ import annotations

import functools

from parscale.serving.vllm_config import placeholder_count, placeholder_id

EXTRA_ARG = "parscale_placeholders"
_INSTALLED = False


def _placeholders(model_config) -> tuple[int, int]:
    """(n, the placeholder id) of this model; n = 0 for a model without a prefix."""
    hf_config = model_config.hf_config
    n = placeholder_count(hf_config)
    return n, (placeholder_id(hf_config) if n else -1)


def _user_max_model_len(model_config) -> int:
    return model_config.max_model_len - _placeholders(model_config)[0]


def _wrap_max_len(original):
    @functools.wraps(original)
    def get_and_verify_max_len(self, max_model_len):
        return original(self, max_model_len) + _placeholders(self)[0]

    return get_and_verify_max_len


def _wrap_process_inputs(original):
    @functools.wraps(original)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original(self, request_id, prompt, params, *args, **kwargs)
        n, pid = _placeholders(self.model_config)
        if not n:
            return request
        if request.prompt_embeds is not None or request.prompt_token_ids is None:
            raise ValueError("a ParScale model takes text or token-id prompts; prompt embeddings are not supported")
        sampling = request.sampling_params
        if sampling is None:
            raise ValueError("a ParScale model generates text; pooling requests are not supported")
        if sampling.prompt_logprob_token_ids is not None:
            raise ValueError("prompt_logprob_token_ids is not supported for a ParScale model; use prompt_logprobs")
        real, limit = len(request.prompt_token_ids), _user_max_model_len(self.model_config)
        if real >= limit:  # vLLM's own rule on the real tokens: the prompt plus at least one output token
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(f"The decoder prompt (length {real}) plus the number of requested output "
                                      f"tokens (at least 1) is longer than the maximum model length of {limit}.")
        if sampling.max_tokens is not None:
            # vLLM's default, max_model_len - prompt length, was computed on the engine's length (+ n).
            sampling.max_tokens = min(sampling.max_tokens, limit - real)
        request.prompt_token_ids = [pid] * n + list(request.prompt_token_ids)
        sampling.extra_args = {**(sampling.extra_args or {}), EXTRA_ARG: n}
        return request

    return process_inputs


def _request_placeholders(request) -> int:
    sampling = getattr(request, "sampling_params", None)
    return int(((sampling.extra_args or {}) if sampling is not None else {}).get(EXTRA_ARG, 0))


def _wrap_from_new_request(original):
    @functools.wraps(original)
    def from_new_request(cls, tokenizer, request, *args, **kwargs):
        n = _request_placeholders(request)
        if not n:
            return original.__func__(cls, tokenizer, request, *args, **kwargs)
        import msgspec

        visible = msgspec.structs.replace(request, prompt_token_ids=list(request.prompt_token_ids[n:]))
        state = original.__func__(cls, tokenizer, visible, *args, **kwargs)
        state.parscale_placeholders = n
        if state.logprobs_processor is not None:
            state.logprobs_processor.parscale_rows_to_drop = n
        return state

    return classmethod(from_new_request)


def _wrap_new_request_output(original):
    @functools.wraps(original)
    def _new_request_output(self, *args, **kwargs):
        n = getattr(self, "parscale_placeholders", 0)
        if not n:
            return original(self, *args, **kwargs)
        engine_count = self.num_cached_tokens
        self.num_cached_tokens = max(0, engine_count - n)  # prefix caching hits the placeholders first
        try:
            return original(self, *args, **kwargs)
        finally:
            self.num_cached_tokens = engine_count

    return _new_request_output


def _wrap_update_prompt_logprobs(original):
    @functools.wraps(original)
    def _update_prompt_logprobs(self, tensors):
        drop = getattr(self, "parscale_rows_to_drop", 0)
        if drop:
            # Rows 0 .. n-1 score the placeholders 1 .. n-1 and the first real token, which only a placeholder
            # query saw: a plain model has no score for its first token (None). Chunked prefill may send the
            # rows in several parts, so the count carries over.
            rows = tensors[1].shape[0]
            cut = min(drop, rows)
            self.parscale_rows_to_drop = drop - cut
            if cut == rows:
                return None
            tensors = type(tensors)(*(t[cut:] if t is not None and hasattr(t, "shape") else t for t in tensors))
        return original(self, tensors)

    return _update_prompt_logprobs


def _wrap_add_request(original):
    @functools.wraps(original)
    def add_request(self, request, *args, **kwargs):
        n, pid = _placeholders(self.vllm_config.model_config)
        ids = request.prompt_token_ids
        if n and (ids is None or len(ids) <= n or any(i != pid for i in ids[:n])):
            raise ValueError(f"request {request.request_id} reached a ParScale model without its {n} prefix "
                             f"placeholders (id {pid}) in front: prompts must pass through vLLM's input processor "
                             "with the parscale plugin loaded")
        return original(self, request, *args, **kwargs)

    return add_request


# The worker's prompt-token tensor is built without the model config at hand; the model registers its
# placeholders here when it is built in this process (vllm_model.py).
WORKER_PLACEHOLDERS = {"n": 0, "id": -1}


def _wrap_prompt_token_tensor(original):
    @functools.wraps(original)
    def _make_prompt_token_ids_cpu_tensor(self):
        tensor = original(self)
        n, pid = WORKER_PLACEHOLDERS["n"], WORKER_PLACEHOLDERS["id"]
        if n and tensor.shape[1] >= n:
            head = tensor[:, :n]
            is_request = (head == pid).all(dim=1)
            head[is_request] = self.vocab_size  # vLLM's padding value: counted by no penalty
        return tensor

    return _make_prompt_token_ids_cpu_tensor


def _wrap_reported_max_len(original):
    """An async answer of the OpenAI server that carries max_model_len (a ModelList's cards, or a response)."""

    @functools.wraps(original)
    async def answer(self, *args, **kwargs):
        result = await original(self, *args, **kwargs)
        n = _placeholders(self.model_config)[0]
        for item in getattr(result, "data", None) or [result]:
            if n and getattr(item, "max_model_len", None) is not None:
                item.max_model_len = self.model_config.max_model_len - n
        return result

    return answer


def install() -> None:
    """Apply the wrappers once per process (vLLM calls the plugin in every one of its processes)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.config.model import ModelConfig
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.engine.output_processor import RequestState
    from vllm.v1.worker.gpu_input_batch import InputBatch

    ModelConfig.get_and_verify_max_len = _wrap_max_len(ModelConfig.get_and_verify_max_len)
    InputProcessor.process_inputs = _wrap_process_inputs(InputProcessor.process_inputs)
    RequestState.from_new_request = _wrap_from_new_request(RequestState.__dict__["from_new_request"])
    RequestState._new_request_output = _wrap_new_request_output(RequestState._new_request_output)
    LogprobsProcessor._update_prompt_logprobs = _wrap_update_prompt_logprobs(LogprobsProcessor._update_prompt_logprobs)
    EngineCore.add_request = _wrap_add_request(EngineCore.add_request)
    InputBatch._make_prompt_token_ids_cpu_tensor = _wrap_prompt_token_tensor(
        InputBatch._make_prompt_token_ids_cpu_tensor)
    try:  # the OpenAI server's modules (absent from a minimal vLLM install)
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
    except ImportError:
        pass
    else:
        OpenAIServingModels.show_available_models = _wrap_reported_max_len(OpenAIServingModels.show_available_models)
        ServingTokenization.create_tokenize = _wrap_reported_max_len(ServingTokenization.create_tokenize)
    _INSTALLED = True
