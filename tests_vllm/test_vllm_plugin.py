"""`vllm.LLM` and `vllm serve` on qwen2_parscale folders equal parscale itself: greedy tokens identical,
prompt log-probabilities within 1e-4 (fp32), for single prompts, batches of different lengths, prefix-cache
hits and chunked prefill (the OpenAI-compatible server: test_vllm_openai.py)."""

import pytest
import torch
from conftest import make_model
from vllm import LLM, SamplingParams

import parscale

PROMPTS = ["def fib(n):", "The quick brown fox jumps over the lazy dog, and then", "x"]
NEW = 16

# P, prefix tokens, ε, tied: every P the paper uses, several n_tokens and ε, tied and untied embeddings; p1 is a
# plain qwen2 folder (vLLM's own Qwen2 class, which the plugin must leave alone), p1-released a qwen2_parscale
# folder with parscale_n = 1 (as the released P = 1 checkpoints are), p1-prefix the P = 1 prefix control;
# llama-p4 (llama3 RoPE scaling, no q/k/v bias) and qwen3-p2 (q/k norms) are this library's own types.
VARIANTS = {"p1": dict(streams=1), "p2": dict(streams=2, n_tokens=8, smooth=0.1),
            "p4": dict(streams=4, n_tokens=4, smooth=0.0, tied=False), "p8": dict(streams=8, n_tokens=16, smooth=0.1,
                                                                               tied=False),
            "p1-prefix": dict(streams=1, n_tokens=8, p1_prefix=True), "p1-released": dict(streams=1, released_p1=True),
            "llama-p4": dict(family="llama", streams=4, n_tokens=8, tied=False),
            "qwen3-p2": dict(family="qwen3", streams=2, n_tokens=4)}


def reference(folder, prompt: str):
    """parscale's greedy continuation and the log-probability of every prompt token after the first."""
    model, tok = parscale.load(folder), parscale.load_tokenizer(folder)
    ids = torch.tensor([tok.encode(prompt).ids])
    greedy = parscale.generate(model, ids, max_new_tokens=NEW, generation_config={})[0].tolist()
    with torch.no_grad():
        logprobs = model(ids).log_softmax(-1)[0]
    return ids[0].tolist(), greedy, [float(logprobs[i - 1, ids[0, i]]) for i in range(1, ids.shape[1])]


def check(output, folder, prompt) -> None:
    """What a user reads back is what a plain model gives: the prompt's own ids, None for the first token's
    log-prob, then parscale's."""
    ids, greedy, logprobs = reference(folder, prompt)
    assert output.prompt_token_ids == ids
    assert list(output.outputs[0].token_ids) == greedy, prompt
    assert len(output.prompt_logprobs) == len(ids) and output.prompt_logprobs[0] is None
    theirs = [output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
    assert theirs == pytest.approx(logprobs, abs=1e-4), prompt


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llm_equals_parscale(tmp_path, variant, engine_args):
    folder = make_model(tmp_path / variant, **VARIANTS[variant])
    reference_tokens = reference(folder, PROMPTS[0])[1]
    assert len(set(reference_tokens)) > 3  # the model is not degenerate, so equal tokens mean something
    llm = LLM(str(folder), **engine_args)
    params = SamplingParams(max_tokens=NEW, temperature=0, prompt_logprobs=0, ignore_eos=True)
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, params), strict=True):  # one batch of 3 lengths
        check(output, folder, prompt)
    (single,) = llm.generate([PROMPTS[1]], params)
    check(single, folder, PROMPTS[1])


def test_prefix_cache_hits_and_chunked_prefill(tmp_path, engine_args):
    folder = make_model(tmp_path / "m", streams=4, n_tokens=8)
    system = "You are a careful assistant who answers in one line. " * 3
    prompts = [system + "What is 2 + 2?", system + "Name a colour."]
    llm = LLM(str(folder), **{**engine_args, "enable_prefix_caching": True, "enable_chunked_prefill": True,
                              "max_num_batched_tokens": 64, "max_num_seqs": 4})
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    (first,) = llm.generate([prompts[0]], greedy)  # a 170-token prompt, prefilled in chunks of 64
    (second,) = llm.generate([prompts[1]], greedy)  # shares the placeholders and the system prompt
    # Whole 16-token blocks hit; the 8 placeholders are not counted (a plain model would report the same).
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 120
    for prompt, output in ((prompts[0], first), (prompts[1], second)):
        assert list(output.outputs[0].token_ids) == reference(folder, prompt)[1]
    # vLLM computes prompt log-probabilities without the prefix cache; chunked prefill still applies.
    (scored,) = llm.generate([prompts[1]], SamplingParams(max_tokens=NEW, temperature=0, prompt_logprobs=0,
                                                          ignore_eos=True))
    check(scored, folder, prompts[1])


def test_bf16_is_as_close_to_fp32_as_parscales_own_bf16(tmp_path, engine_args):
    """In bf16 the oracle is the fp32 model: vLLM's prompt log-probabilities may be off by no more than twice
    what parscale's own bf16 path is off (two bf16 paths differ from each other by about their error)."""
    folder = make_model(tmp_path / "m", streams=4, n_tokens=8)
    llm = LLM(str(folder), **{**engine_args, "dtype": "bfloat16"})
    prompt = PROMPTS[1]
    (output,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    tok = parscale.load_tokenizer(folder)
    ids = tok.encode(prompt).ids

    def prompt_logprobs(model):
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).float().log_softmax(-1)[0]
        return torch.tensor([float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))])

    exact = prompt_logprobs(parscale.load(folder))
    own_bf16 = prompt_logprobs(parscale.load(folder, dtype="bfloat16"))
    theirs = torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    assert (theirs - exact).abs().mean() <= 2 * (own_bf16 - exact).abs().mean()
    assert (theirs - exact).abs().mean() > 0  # really bf16


def test_prefix_changed_in_place_is_served_fresh(tmp_path, engine_args):
    """A weight update that bypasses load_weights (an in-place change of the prefix, as RL weight sync or
    LLM.apply_model does) must reach the placeholder slots: the output equals parscale's with the same change."""
    folder = make_model(tmp_path / "m", streams=2, n_tokens=8)
    llm = LLM(str(folder), **engine_args)
    params = SamplingParams(max_tokens=NEW, temperature=0, prompt_logprobs=0, ignore_eos=True)
    (before,) = llm.generate([PROMPTS[1]], params)
    check(before, folder, PROMPTS[1])

    def scale_prefix(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("prefix_k", "prefix_v")):
                    p.mul_(-1.5)

    llm.apply_model(scale_prefix)
    changed = parscale.load(folder)
    scale_prefix(changed)
    edited = tmp_path / "edited"
    parscale.save(changed, edited, tokenizer_from=folder)
    (after,) = llm.generate([PROMPTS[1]], params)
    assert list(after.outputs[0].token_ids) != list(before.outputs[0].token_ids)  # the change matters
    check(after, edited, PROMPTS[1])
