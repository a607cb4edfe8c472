"""The prefix's placeholders stay inside the engine: what a user or a tool reads back from a ParScale model on
vLLM is what vLLM's own plain model gives for the same prompt (differential tests against a plain qwen2
folder with the same tokenizer), every way a prompt reaches the model gets them, the repetition penalty does
not count them, and settings the model cannot serve exactly are refused at load."""

import gc
import json
import types

import pytest
import torch
from conftest import make_model
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

import parscale

MAX_LEN = 64
PROMPT = "def fib(n):"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"parscale": make_model(root / "p4", streams=4, n_tokens=8, tied=False),
            "plain": make_model(root / "p1", streams=1)}


def engine(folder, engine_args, **changes):
    """One engine at a time: vLLM's CPU build sizes its KV cache from the memory left, so a second engine
    alive in the same process finds none."""
    gc.collect()
    return LLM(str(folder), **{**engine_args, "max_model_len": MAX_LEN, **changes})


def greedy_reference(folder, ids, new, **kwargs):
    model = parscale.load(folder)
    return parscale.generate(model, torch.tensor([ids]), max_new_tokens=new, generation_config={}, **kwargs)[0].tolist()


def test_what_is_read_back_is_shaped_as_a_plain_models(folders, engine_args):
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2, logprobs=1, ignore_eos=True)
    (plain,) = engine(folders["plain"], engine_args).generate([PROMPT], params)
    (ours,) = engine(folders["parscale"], engine_args).generate([PROMPT], params)
    assert ours.prompt_token_ids == plain.prompt_token_ids
    assert ours.prompt == plain.prompt
    assert len(ours.prompt_logprobs) == len(plain.prompt_logprobs) and ours.prompt_logprobs[0] is None
    for mine, theirs in zip(ours.prompt_logprobs[1:], plain.prompt_logprobs[1:], strict=True):
        assert len(mine) == len(theirs)  # the prompt token and the top 2, as many entries as vLLM's own
    assert ours.num_cached_tokens == plain.num_cached_tokens == 0


def test_max_model_len_counts_real_tokens(folders, engine_args):
    for name, folder in folders.items():
        llm = engine(folder, engine_args)
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=list(range(1, MAX_LEN)))],
                              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length", name
        with pytest.raises(Exception, match=f"longer than the maximum model length of {MAX_LEN}"):
            llm.generate([TokensPrompt(prompt_token_ids=list(range(1, MAX_LEN + 1)))], SamplingParams(max_tokens=1))
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=list(range(1, 41)))],
                              SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == MAX_LEN - 40, name  # the default: up to max_model_len
        del llm


def test_every_prompt_path_gets_the_placeholders(folders, engine_args):
    folder = folders["parscale"]
    llm = engine(folder, engine_args)
    tok = parscale.load_tokenizer(folder)
    ids = tok.encode(PROMPT).ids
    expected = greedy_reference(folder, ids, 6)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    mixed = llm.generate([PROMPT, TokensPrompt(prompt_token_ids=ids)], greedy)  # a batch of both kinds
    assert [list(o.outputs[0].token_ids) for o in mixed] == [expected, expected]
    (several,) = llm.generate([PROMPT], SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=1, prompt_logprobs=0))
    assert several.prompt_token_ids == ids and len(several.outputs) == 2  # n > 1: each child request is hidden too
    assert len(several.prompt_logprobs) == len(ids) and several.prompt_logprobs[0] is None
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (chat,) = llm.chat([{"role": "user", "content": PROMPT}], greedy, chat_template=template)
    assert chat.prompt_token_ids == ids and list(chat.outputs[0].token_ids) == expected
    from vllm.sampling_params import BeamSearchParams

    (beam,) = llm.beam_search([TokensPrompt(prompt_token_ids=ids)], BeamSearchParams(beam_width=1, max_tokens=6,
                                                                                      ignore_eos=True))
    assert beam.sequences[0].tokens == ids + expected  # width 1 is greedy search
    del llm
    bare = engine(folder, engine_args, skip_tokenizer_init=True)
    (out,) = bare.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=6, temperature=0,
                                                                                 ignore_eos=True, detokenize=False))
    assert out.prompt_token_ids == ids and list(out.outputs[0].token_ids) == expected


def test_prompt_embeddings_are_refused(folders, engine_args):
    from vllm.inputs import EmbedsPrompt

    llm = engine(folders["parscale"], engine_args, enable_prompt_embeds=True)
    with pytest.raises(ValueError, match="prompt embeddings are not supported"):
        llm.generate([EmbedsPrompt(prompt_embeds=torch.zeros(3, 128))], SamplingParams(max_tokens=1))


def test_a_request_without_placeholders_is_refused_by_the_engine(folders):
    """A prompt that reaches the engine another way (not through vLLM's input processor) would have its first n
    tokens' keys and values replaced by the prefix: the engine refuses it."""
    from vllm.transformers_utils.config import get_config
    from vllm.v1.engine.core import EngineCore

    import parscale.serving.vllm_plugin as plugin

    plugin.register()
    hf_config = get_config(str(folders["parscale"]), trust_remote_code=False)
    engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(model_config=types.SimpleNamespace(
        hf_config=hf_config)))
    request = types.SimpleNamespace(request_id="r0", prompt_token_ids=[5, 6, 7] * 4)
    with pytest.raises(ValueError, match="without its 8 prefix placeholders"):
        EngineCore.add_request(engine, request)


def test_the_repetition_penalty_does_not_count_placeholders(tmp_path, engine_args):
    """The placeholder id (the vocabulary's last) is made the greedy choice; parscale's own generate with the
    same repetition penalty keeps it, as a plain model does, since it is not in the prompt. Counting the 8
    placeholders as prompt tokens would divide its logit by the penalty and change the tokens."""
    made = make_model(tmp_path / "m", streams=2, n_tokens=8, tied=False)
    ids = parscale.load_tokenizer(made).encode(PROMPT).ids
    model = parscale.load(made)
    first = greedy_reference(made, ids, 1)[0]
    with torch.no_grad():  # make row 511 a slightly stronger copy of the first greedy token's row
        model.lm_head.weight[511] = model.lm_head.weight[first] * 1.05
    folder = tmp_path / "edited"
    parscale.save(model, folder, tokenizer_from=made)
    for penalty in (1.0, 1.5):
        expected = greedy_reference(folder, ids, 6, repetition_penalty=penalty)
        if penalty > 1:
            assert expected[0] == 511
        llm = engine(folder, engine_args)
        (out,) = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                        repetition_penalty=penalty))
        assert list(out.outputs[0].token_ids) == expected, penalty
        del llm


def _edited_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_is_refused_at_load(tmp_path, engine_args, rope):
    folder = make_model(tmp_path / "m", family="llama", streams=2, n_tokens=4)
    _edited_config(folder, rope_scaling=rope, rope_parameters={"rope_theta": 500000.0, **rope})
    with pytest.raises(Exception, match=f"RoPE type '{rope['rope_type']}' is not supported"):
        engine(folder, engine_args)


def test_lora_is_refused_at_load(tmp_path, engine_args):
    folder = make_model(tmp_path / "m", streams=2, n_tokens=4)
    with pytest.raises(Exception, match="LoRA"):
        engine(folder, engine_args, enable_lora=True)


def test_quantization_is_refused_at_load(tmp_path, engine_args):
    folder = make_model(tmp_path / "m", streams=2, n_tokens=4)
    with pytest.raises(Exception, match=r"quantization \(fp8\) is not supported by the parscale vLLM model"):
        engine(folder, engine_args, dtype="bfloat16", quantization="fp8")
