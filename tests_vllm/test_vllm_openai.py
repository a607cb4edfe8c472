"""vLLM's OpenAI-compatible server on a ParScale folder, through the `openai` client package: completions with
echo and log-probs, chat completions with the folder's template, streamed and not. Each answer is checked
against parscale's own model (tokens, log-probs) and against the same server on a plain model with the same
tokenizer (usage counts, echo, the shape of the log-probs): the placeholders never show."""

import json
import urllib.request

import pytest
import torch
from conftest import make_model, openai_server
from openai import OpenAI

import parscale

PROMPT = "def fib(n):"
MESSAGES = [{"role": "user", "content": "Say something."}]
NEW = 8


def ask(base_url: str, folder) -> dict:
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none")
    model = str(folder)
    # vLLM leaves the prompt's text out of an echo when token ids are asked for: two requests.
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0, echo=True,
                                     logprobs=1, extra_body={"ignore_eos": True})
    ids = client.completions.create(model=model, prompt=PROMPT, max_tokens=NEW, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    models = json.loads(urllib.request.urlopen(f"{base_url}/v1/models", timeout=60).read())
    body = json.dumps({"model": model, "prompt": PROMPT}).encode()
    tokenized = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{base_url}/tokenize", body, {"Content-Type": "application/json"}), timeout=60).read())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return {"echo": echo, "ids": ids, "chat": chat, "streamed_text": streamed, "models": models,
            "tokenized": tokenized,
            "streamed_usage": next(c.usage for c in chunks if c.usage is not None)}


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    folders = {"parscale": make_model(root / "p4", streams=4, n_tokens=8, tied=False),
               "plain": make_model(root / "p1", streams=1)}
    out = {}
    for name, folder in folders.items():
        with openai_server(folder) as url:
            out[name] = ask(url, folder)
    return folders, out


def test_completion_with_echo_and_logprobs_equals_parscale(answers):
    folders, out = answers
    folder = folders["parscale"]
    tok = parscale.load_tokenizer(folder)
    ids = tok.encode(PROMPT).ids
    model = parscale.load(folder)
    greedy = parscale.generate(model, torch.tensor([ids]), max_new_tokens=NEW, generation_config={})[0].tolist()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids + greedy])).log_softmax(-1)[0]
    with_ids = out["parscale"]["ids"].choices[0]
    assert with_ids.token_ids == greedy and with_ids.prompt_token_ids == ids
    choice = out["parscale"]["echo"].choices[0]
    assert choice.text == PROMPT + with_ids.text  # the echo is the prompt, not placeholders
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ids) + NEW and lp.token_logprobs[0] is None
    sequence = ids + greedy
    expected = [float(logprobs[i - 1, sequence[i]]) for i in range(1, len(sequence))]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_usage_echo_and_logprob_shapes_match_a_plain_model(answers):
    _, out = answers
    ours, plain = out["parscale"], out["plain"]
    for key in ("echo", "ids", "chat"):
        assert ours[key].usage.prompt_tokens == plain[key].usage.prompt_tokens, key
        assert ours[key].usage.completion_tokens == plain[key].usage.completion_tokens == NEW, key
    assert ours["streamed_usage"].prompt_tokens == plain["streamed_usage"].prompt_tokens
    assert ours["ids"].choices[0].prompt_token_ids == plain["ids"].choices[0].prompt_token_ids
    assert ours["models"]["data"][0]["max_model_len"] == plain["models"]["data"][0]["max_model_len"] == 512
    assert ours["tokenized"] == plain["tokenized"]  # tokens, count and max_model_len
    mine, theirs = ours["echo"].choices[0], plain["echo"].choices[0]
    n = len(plain["ids"].choices[0].prompt_token_ids)
    assert mine.text[:len(PROMPT)] == theirs.text[:len(PROMPT)] == PROMPT
    assert len(mine.logprobs.tokens) == len(theirs.logprobs.tokens) == n + NEW
    assert mine.logprobs.tokens[:n] == theirs.logprobs.tokens[:n]  # the prompt's tokens, as a plain model's
    assert mine.logprobs.text_offset[:n] == theirs.logprobs.text_offset[:n]
    assert mine.logprobs.token_logprobs[0] is None and theirs.logprobs.token_logprobs[0] is None


def test_chat_uses_the_folders_template_streamed_or_not(answers):
    folders, out = answers
    folder = folders["parscale"]
    text = parscale.apply_chat_template(folder, MESSAGES)
    tok = parscale.load_tokenizer(folder)
    ids = tok.encode(text).ids
    greedy = parscale.generate(parscale.load(folder), torch.tensor([ids]), max_new_tokens=NEW,
                               generation_config={})[0].tolist()
    chat = out["parscale"]["chat"]
    assert chat.prompt_token_ids == ids
    assert chat.choices[0].token_ids == greedy
    assert chat.usage.prompt_tokens == len(ids)
    assert out["parscale"]["streamed_text"] == chat.choices[0].message.content
