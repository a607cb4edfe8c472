"""parscale's lm-eval model against lm-eval's own `hf` model on the same folders: generation requests.

Each folder holds one tiny random Hugging Face model (P = 1, so both read the same weights), a byte-level
tokenizer and tokenizer_config.json; both models are built from the folder's files alone. Greedy text must be
equal; sampling must follow lm-eval's semantics (k repeats differ, --seed repeats a run).
"""

import json

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("lm_eval")

from hf_oracle import make_hf_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
          "{% endif %}")


def make_folder(folder, kind: str):
    """A model folder of one kind: 'qwen2' (EOS only), 'llama-bos' (a BOS-adding tokenizer, named) or
    'instruct' (ChatML with a Qwen3-style thinking switch, several end ids in generation_config.json)."""
    from tokenizers.processors import TemplateProcessing

    from parscale.training.tokenizer import byte_tokenizer

    make_hf_model("llama" if kind == "llama-bos" else "qwen2", folder)
    # config.json names other special ids than the tokenizer files: lm-eval's hf reads the tokenizer's
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    tok = byte_tokenizer()
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if kind == "llama-bos":
        tok.add_special_tokens(["<|begin_of_text|>"])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                special_tokens=[("<|begin_of_text|>", bos)])
        config["bos_token"] = "<|begin_of_text|>"
    if kind == "instruct":
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
        config.update(eos_token="<|im_end|>", chat_template=CHATML)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def models(folder, **args):
    from lm_eval.models.huggingface import HFLM

    from parscale.analysis.lm_eval_model import ParScaleLM

    ours = ParScaleLM(pretrained=str(folder), batch_size=1, max_length=128, **args)
    ref = HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=1, max_length=128, **args)
    return ours, ref


def generate(lm, requests):
    return lm.generate_until([Instance("generate_until", {}, req, i) for i, req in enumerate(requests)])


def set_end_ids(folder, ids):
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))


@pytest.mark.parametrize("kind", ["qwen2", "llama-bos", "instruct"])
def test_greedy_generation_equals_lm_evals_hf_model(tmp_path, kind):
    folder = make_folder(tmp_path / kind, kind)
    ours, ref = models(folder)
    contexts = ["def f(x):", "Question: 2 + 3?\nAnswer:", "a" * 150]  # the last is left-truncated
    plain = [(c, {"until": [], "max_gen_toks": 12, "do_sample": False}) for c in contexts]
    theirs = generate(ref, plain)
    assert generate(ours, plain) == theirs
    # settings lm-eval normalises: do_sample=False wins over a temperature; max_new_tokens is max_gen_toks
    variants = [(contexts[0], {"until": [], "do_sample": False, "temperature": 0.7, "max_gen_toks": 12}),
                (contexts[0], {"until": [], "max_new_tokens": 5}),
                (contexts[0], {"until": "zz", "temperature": 0.0, "max_gen_toks": 12})]
    assert generate(ours, variants) == generate(ref, variants)
    # an `until` string the greedy text holds: both cut there, and stop
    stop = theirs[0][4:6]
    cut = [(contexts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False})]
    assert generate(ours, cut) == generate(ref, cut) == [theirs[0][: theirs[0].index(stop)]]


def test_generation_stops_at_every_end_id_of_generation_config(tmp_path):
    from parscale.analysis.lm_eval_model import ParScaleLM

    folder = make_folder(tmp_path / "m", "instruct")
    probe = ParScaleLM(pretrained=str(folder), max_length=128)
    tokens = probe.tokenizer.encode(generate(probe, [("hi", {"until": [], "max_gen_toks": 8})])[0],
                                    add_special_tokens=False).ids
    set_end_ids(folder, [probe.tokenizer.token_to_id("<|im_end|>"), tokens[3]])  # the 4th token ends the turn
    ours, ref = models(folder)
    req = [("hi", {"until": [], "max_gen_toks": 8, "do_sample": False})]
    assert generate(ours, req) == generate(ref, req)
    assert len(probe.tokenizer.encode(generate(ours, req)[0], add_special_tokens=False).ids) <= 4


def test_sampled_repeats_differ_and_a_seed_repeats_the_run(tmp_path):
    folder = make_folder(tmp_path / "m", "qwen2")
    ours, _ = models(folder)
    reqs = [("def f(x):", {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0})] * 4
    torch.manual_seed(1234)  # what lm-eval's --seed sets (its torch seed)
    first = generate(ours, reqs)
    torch.manual_seed(1234)
    assert generate(ours, reqs) == first
    assert len(set(first)) == 4


def test_task_top_k_and_top_p_are_used(tmp_path):
    folder = make_folder(tmp_path / "m", "qwen2")
    ours, _ = models(folder)
    greedy = generate(ours, [("def f(x):", {"until": [], "max_gen_toks": 10})])
    # top_k = 1 makes sampling greedy: the task's setting reached the sampler
    assert generate(ours, [("def f(x):", {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0,
                                          "top_k": 1})]) == greedy
    assert generate(ours, [("def f(x):", {"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": 1.0,
                                          "top_p": 1e-9})]) == greedy


def test_unknown_model_args_are_an_error(tmp_path):
    from parscale.analysis.lm_eval_model import ParScaleLM

    folder = make_folder(tmp_path / "m", "qwen2")
    with pytest.raises(ValueError, match="does not take: max_lenght"):
        ParScaleLM(pretrained=str(folder), max_lenght=64)


def test_empty_context_scores_with_the_tokenizers_end_of_text_as_hf(tmp_path):
    """The prefix token comes from the tokenizer files, not config.json (which names another EOS id here)."""
    folder = make_folder(tmp_path / "m", "qwen2")
    ours, ref = models(folder)
    assert ours.eot_token_id == ref.eot_token_id and ours.prefix_token_id == ref.prefix_token_id
    reqs = [Instance("loglikelihood", {}, ("", "abc"), 0), Instance("loglikelihood", {}, ("x", " y"), 1)]
    for (a, _), (b, _) in zip(ours.loglikelihood(reqs), ref.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    rolling = [Instance("loglikelihood_rolling", {}, ("some text " * 30,), 0)]
    assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(ref.loglikelihood_rolling(rolling)[0], abs=1e-3)


@pytest.mark.parametrize("multiturn", [False, True])
def test_a_chat_task_run_equals_lm_evals_hf_model(tmp_path, multiturn):
    """A whole few-shot generation task through lm-eval with --apply_chat_template, --system_instruction,
    --fewshot_as_multiturn and enable_thinking=False: the same prompts and the same greedy answers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import parscale.analysis.lm_eval_model  # noqa: F401  (registers the model)

    folder = make_folder(tmp_path / "m", "instruct")
    runs = {}
    for name in ("parscale", "hf"):
        extra = ",device=cpu,dtype=float32" if name == "hf" else ""
        res = lm_eval.simple_evaluate(
            model=name, model_args=f"pretrained={folder},max_length=256,enable_thinking=False{extra}",
            tasks=["parscale_arith_example"], task_manager=TaskManager(include_path="examples/lm_eval_tasks"),
            limit=2, apply_chat_template=True, system_instruction="Answer briefly.", fewshot_as_multiturn=multiturn,
            log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        runs[name] = [(s["arguments"], s["resps"]) for s in res["samples"]["parscale_arith_example"]]
    assert runs["parscale"] == runs["hf"]
    prompt = str(runs["hf"][0][0])  # the request's arguments: (prompt, generation settings)
    assert "Answer briefly." in prompt and "<think>\\n\\n</think>" in prompt
