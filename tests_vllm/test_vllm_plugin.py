"""`vllm.LLM` and `vllm serve` on qwen2_parscale folders equal parscale itself: greedy tokens identical,
prompt log-probabilities within 1e-4 (fp32), for single prompts, batches of different lengths, prefix-cache
hits and chunked prefill; the OpenAI-compatible server answers a completion."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

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
    ids, greedy, logprobs = reference(folder, prompt)
    placeholders = len(output.prompt_token_ids) - len(ids)
    assert output.prompt_token_ids[placeholders:] == ids
    assert list(output.outputs[0].token_ids) == greedy, prompt
    theirs = [output.prompt_logprobs[placeholders + i][ids[i]].logprob for i in range(1, len(ids))]
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
    spec = VARIANTS[variant]
    expected_placeholders = spec["n_tokens"] if spec["streams"] > 1 or spec.get("p1_prefix") else 0
    assert len(single.prompt_token_ids) == len(reference(folder, PROMPTS[1])[0]) + expected_placeholders


def test_prefix_cache_hits_and_chunked_prefill(tmp_path, engine_args):
    folder = make_model(tmp_path / "m", streams=4, n_tokens=8)
    system = "You are a careful assistant who answers in one line. " * 3
    prompts = [system + "What is 2 + 2?", system + "Name a colour."]
    llm = LLM(str(folder), **{**engine_args, "enable_prefix_caching": True, "enable_chunked_prefill": True,
                              "max_num_batched_tokens": 64, "max_num_seqs": 4})
    greedy = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    (first,) = llm.generate([prompts[0]], greedy)  # a 170-token prompt, prefilled in chunks of 64
    (second,) = llm.generate([prompts[1]], greedy)  # shares the placeholders and the system prompt
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 128  # whole 16-token blocks hit
    for prompt, output in ((prompts[0], first), (prompts[1], second)):
        assert list(output.outputs[0].token_ids) == reference(folder, prompt)[1]
    # vLLM computes prompt log-probabilities without the prefix cache; chunked prefill still applies.
    (scored,) = llm.generate([prompts[1]], SamplingParams(max_tokens=NEW, temperature=0, prompt_logprobs=0,
                                                          ignore_eos=True))
    check(scored, folder, prompts[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_completion(tmp_path):
    folder = make_model(tmp_path / "m", streams=2, n_tokens=8)
    port = _free_port()
    # `vllm serve DIR` on vLLM's CUDA build; the CPU build's `vllm` command stops at start-up (it asks for the
    # version of a distribution named "vllm"), so its server module is started directly.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                               "--gpu-memory-utilization", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(1)
        body = json.dumps({"model": str(folder), "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0,
                           "ignore_eos": True, "return_token_ids": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
    finally:
        server.terminate()
        server.wait(timeout=60)
    _, greedy, _ = reference(folder, PROMPTS[0])
    assert answer["choices"][0]["token_ids"] == greedy
    # The text is the same bytes; a server holds back a last character that is not complete yet.
    assert parscale.load_tokenizer(folder).decode(greedy).startswith(answer["choices"][0]["text"])


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
    n = len(output.prompt_token_ids) - len(ids)
    theirs = torch.tensor([output.prompt_logprobs[n + i][ids[i]].logprob for i in range(1, len(ids))])
    assert (theirs - exact).abs().mean() <= 2 * (own_bf16 - exact).abs().mean()
    assert (theirs - exact).abs().mean() > 0  # really bf16


def test_placeholders_go_in_front_of_token_prompts_and_embeddings_are_refused():
    from parscale.serving.vllm_renderer import PrefixPlaceholderRenderer

    renderer = object.__new__(PrefixPlaceholderRenderer)  # the method alone, without an engine around it
    renderer._placeholders = [511] * 3
    assert renderer._with_placeholders({"prompt_token_ids": [5, 6]})["prompt_token_ids"] == [511, 511, 511, 5, 6]
    with pytest.raises(ValueError, match="prompt embeddings are not supported"):
        renderer._with_placeholders({"prompt_embeds": torch.zeros(2, 128)})
    renderer._placeholders = []  # any other model: untouched
    assert renderer._with_placeholders({"prompt_embeds": "kept"}) == {"prompt_embeds": "kept"}
