"""`parscale eval` (held-out loss, perplexity, bits per byte) and the lm-evaluation-harness model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

import parscale
from parscale.analysis.evaluate import EvalDataError, evaluate, windows
from parscale.cli import main
from parscale.training.tokenizer import byte_tokenizer

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("n,max_length,stride", [(2, 8, 4), (50, 8, 4), (51, 16, 3), (9, 8, 7), (1000, 64, 32)])
def test_windows_score_every_token_once_with_context(n, max_length, stride):
    scored = []
    for begin, end, n_targets in windows(n, max_length, stride):
        assert end - begin <= max_length and n_targets <= end - begin - 1
        first = end - n_targets
        scored.extend(range(first, end))
        if begin > 0:
            assert first - begin >= max_length - stride
    assert scored == list(range(1, n))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    model = tiny_model(streams=2)
    tmp = tmp_path_factory.mktemp("tok")
    byte_tokenizer().save(str(tmp / "tokenizer.json"))
    parscale.save(model, folder / "ckpt", tokenizer_from=tmp)
    return folder / "ckpt"


def test_loss_equals_direct_computation(checkpoint, tmp_path):
    text = "def f(x):\n    return x * 2\n" * 3
    (tmp_path / "a.txt").write_text(text)
    model, tok = parscale.load(checkpoint), parscale.load_tokenizer(checkpoint)
    result = evaluate(model, tok, tmp_path / "a.txt", progress=False)
    ids = torch.tensor([[256] + tok.encode(text).ids])
    logits = model(ids)[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == ids.shape[1] - 1
    assert result["bits_per_byte"] == pytest.approx(expected * result["tokens"] / math.log(2) / len(text.encode()))


def test_sliding_windows_close_to_full_context(checkpoint, tmp_path):
    (tmp_path / "long.txt").write_text("import os\nprint(os.getcwd())\n" * 20)
    model, tok = parscale.load(checkpoint), parscale.load_tokenizer(checkpoint)
    full = evaluate(model, tok, tmp_path / "long.txt", max_length=512, progress=False)
    slid = evaluate(model, tok, tmp_path / "long.txt", max_length=128, stride=64, progress=False)
    assert slid["tokens"] == full["tokens"]
    assert slid["loss"] == pytest.approx(full["loss"], rel=0.02)


def test_domains_and_files(checkpoint, tmp_path):
    for domain in ("code", "prose"):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "x.txt").write_text(f"{domain} text " * 10)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(checkpoint), "--data", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["domains"]) == {"code", "prose"} and len(result["files"]) == 2
    assert result["tokens"] == sum(d["tokens"] for d in result["domains"].values())


def test_bad_input(checkpoint, tmp_path, capsys):
    model, tok = parscale.load(checkpoint), parscale.load_tokenizer(checkpoint)
    with pytest.raises(EvalDataError, match="does not exist"):
        evaluate(model, tok, tmp_path / "nope.txt", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="no files match"):
        evaluate(model, tok, tmp_path / "empty", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(EvalDataError, match="no field 'text'"):
        evaluate(model, tok, tmp_path / "bad.jsonl", progress=False)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(EvalDataError, match="no text to score"):
        evaluate(model, tok, tmp_path / "blank.txt", progress=False)
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_a_token_shard_is_read_in_the_dtype_its_manifest_names(checkpoint, tmp_path, capsys):
    """A uint32 shard of a `parscale data` folder (vocabulary > 65,536) read as uint16 would give two ids per
    token, every one inside a large vocabulary: a wrong loss without an error. The manifest's dtype is used."""
    model = parscale.load(checkpoint)
    ids = np.random.default_rng(0).integers(1, 250, 300)
    (tmp_path / "val.bin").write_bytes(ids.astype(np.uint32).tobytes())
    (tmp_path / "manifest.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 300}))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "val.bin").write_bytes(ids.astype(np.uint16).tobytes())  # no manifest: uint16
    expected = evaluate(model, None, tmp_path / "plain" / "val.bin", progress=False)
    assert evaluate(model, None, tmp_path / "val.bin", progress=False)["tokens"] == expected["tokens"]
    assert evaluate(model, None, tmp_path / "val.bin", progress=False)["loss"] == pytest.approx(expected["loss"])
    # a --token-dtype that contradicts the manifest is one error
    assert main(["eval", "--model", str(checkpoint), "--data", str(tmp_path / "val.bin"), "--token-dtype",
                 "uint16"]) == 2
    assert "manifest.json says its shards are uint32" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_and_whole(tmp_path_factory):
    """A P = 1 backbone folder, a P = 2 adapter made on it (random prefixes, untrained) and the same P = 2 model
    saved whole: what is scored through the adapter must score as the whole model."""
    from parscale.model.convert import add_streams
    from parscale.training.adapter import save_adapter

    root = tmp_path_factory.mktemp("adapter")
    byte_tokenizer().save(str(root / "tokenizer.json"))
    base = tiny_model(streams=1)
    parscale.save(base, root / "base", tokenizer_from=root)
    adapted = add_streams(base, 2, n_tokens=4)
    save_adapter(adapted, root / "adapter")
    parscale.save(adapted, root / "whole", tokenizer_from=root)
    return root


def test_eval_with_an_adapter_scores_as_the_model_saved_whole(adapter_and_whole, tmp_path, capsys):
    root = adapter_and_whole
    (tmp_path / "a.txt").write_text("def f(x):\n    return x * 2\n" * 4)
    scores = {}
    for name, extra in (("adapter", ["--model", str(root / "base"), "--adapter", str(root / "adapter")]),
                        ("whole", ["--model", str(root / "whole")]), ("base", ["--model", str(root / "base")])):
        assert main(["eval", *extra, "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / f"{name}.json")]) == 0
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["adapter"]["loss"] == pytest.approx(scores["whole"]["loss"], rel=1e-6)
    assert abs(scores["adapter"]["loss"] - scores["base"]["loss"]) > 1e-3  # the adapter was put on
    assert scores["adapter"]["adapter"] == str(root / "adapter") and "adapter" not in scores["whole"]
    # an adapter on a model it was not trained on is one error naming it
    assert main(["eval", "--model", str(root / "whole"), "--adapter", str(root / "adapter"), "--data",
                 str(tmp_path / "a.txt")]) == 2
    assert "adapters go on a P = 1 backbone" in capsys.readouterr().err


lm_eval = pytest.importorskip("lm_eval")


def test_lm_eval_model_with_an_adapter_scores_as_the_model_saved_whole(adapter_and_whole):
    from lm_eval.api.instance import Instance

    from parscale.analysis.lm_eval_model import ParScaleLM

    root = adapter_and_whole
    requests = [Instance("loglikelihood", {}, ("def f(x):", "\n    return x"), 0),
                Instance("loglikelihood", {}, ("", "import os"), 1),
                Instance("loglikelihood_rolling", {}, ("print(1)\n" * 30,), 2)]
    through = ParScaleLM(pretrained=str(root / "base"), adapter=str(root / "adapter"), batch_size=2)
    whole = ParScaleLM(pretrained=str(root / "whole"), batch_size=2)
    plain = ParScaleLM(pretrained=str(root / "base"), batch_size=2)
    assert through.model.config.parscale_n == 2
    for lm_results in ((through, whole), (through, plain)):
        got = [lm.loglikelihood(requests[:2]) + lm.loglikelihood_rolling(requests[2:]) for lm in lm_results]
        first = [r[0] if isinstance(r, tuple) else r for r in got[0]]
        second = [r[0] if isinstance(r, tuple) else r for r in got[1]]
        if lm_results[1] is whole:
            assert first == pytest.approx(second, rel=1e-6)
        else:
            assert first != pytest.approx(second, rel=1e-4)


def test_lm_eval_tasks_end_to_end(checkpoint, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from parscale.analysis.lm_eval_model import ParScaleLM

    monkeypatch.chdir(ROOT)  # the example tasks name their data relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = ParScaleLM(pretrained=str(checkpoint), batch_size=4)
    out = simple_evaluate(model=lm, tasks=["parscale_ppl_example", "parscale_mc_example"],
                          task_manager=TaskManager(include_path=str(ROOT / "examples" / "lm_eval_tasks")))
    ppl = out["results"]["parscale_ppl_example"]
    mc = out["results"]["parscale_mc_example"]
    assert math.isfinite(ppl["word_perplexity,none"]) and ppl["bits_per_byte,none"] > 0
    assert 0.0 <= mc["acc,none"] <= 1.0
    # the rolling log-likelihood agrees with parscale eval on the same documents
    result = evaluate(lm.model, lm.tokenizer, ROOT / "examples" / "lm_eval_tasks" / "ppl_example.jsonl",
                      progress=False)
    assert ppl["bits_per_byte,none"] == pytest.approx(result["bits_per_byte"], rel=1e-4)


def test_registered_name():
    from lm_eval.api.registry import get_model

    import parscale.analysis.lm_eval_model  # noqa: F401  (registers the name)

    assert get_model("parscale").__name__ == "ParScaleLM"


@pytest.mark.parametrize("variant", ["qwen2", "llama", "llama-bos", "llama-bos-named"])
def test_agrees_with_lm_eval_hf_model(variant, tmp_path):
    """Scores equal lm-eval's `hf` model's. "llama-bos" has a tokenizer whose post-processor adds a BOS token
    (as Llama 3's does): kept in contexts, left out of a continuation after an empty context; with
    "-named" the folder's tokenizer_config.json names it bos_token, and it becomes the prefix token."""
    pytest.importorskip("accelerate")
    from hf_oracle import make_hf_model
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from parscale.analysis.lm_eval_model import ParScaleLM

    hf = make_hf_model(variant.split("-")[0], tmp_path)
    tokenizer = byte_tokenizer()
    named = {}
    if variant.startswith("llama-bos"):
        tokenizer.add_special_tokens(["<|begin_of_text|>"])
        bos = tokenizer.token_to_id("<|begin_of_text|>")
        tokenizer.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
        assert tokenizer.encode("a").ids[0] == bos
    if variant == "llama-bos-named":
        named = {"bos_token": "<|begin_of_text|>"}
    # the folder's tokenizer names its end-of-text token, as the `hf` model's tokenizer below does (config.json's
    # EOS id differs: lm-eval reads the tokenizer's)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", **named}))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|endoftext|>",
                                  **named)
    pairs = [("hello", " world"), ("", "abc"), ("def f(x):", "\n    return x "), ("a" * 100, "bc")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rolling = [Instance("loglikelihood_rolling", {}, ("some text " * 20,), 0)]
    for add_bos in [None] + ([False] if variant.startswith("llama-bos") else []):  # the default, then forced off
        ours = ParScaleLM(pretrained=str(tmp_path), batch_size=3, max_length=64,
                          **({} if add_bos is None else {"add_bos_token": str(add_bos).lower()}))
        ref = HFLM(pretrained=hf, tokenizer=tok, batch_size=3, max_length=64, add_bos_token=add_bos)
        for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs), ref.loglikelihood(reqs), strict=True):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb, add_bos
        assert ours.loglikelihood_rolling(rolling)[0] == pytest.approx(ref.loglikelihood_rolling(rolling)[0],
                                                                       abs=1e-3)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.xz"])
def test_compressed_jsonl_is_read_as_text(checkpoint, tmp_path, suffix):
    """The same rows give the same result whether the JSONL is plain, gzip or xz (as `parscale data` reads them)."""
    import gzip
    import lzma

    rows = [{"text": "def f(x):\n    return x\n", "domain": "code"}, {"text": "Hello there. " * 5, "domain": "prose"}]
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    path = tmp_path / f"d{suffix}"
    path.write_bytes({".jsonl": lambda b: b, ".jsonl.gz": gzip.compress, ".jsonl.xz": lzma.compress}[suffix](data))
    (tmp_path / "plain.jsonl").write_bytes(data)
    model, tok = parscale.load(checkpoint), parscale.load_tokenizer(checkpoint)
    got = evaluate(model, tok, path, progress=False)
    ref = evaluate(model, tok, tmp_path / "plain.jsonl", progress=False)
    assert set(got["domains"]) == {"code", "prose"}
    assert got["loss"] == ref["loss"] and got["tokens"] == ref["tokens"]
    assert got["bits_per_byte"] == ref["bits_per_byte"]


def test_bad_jsonl_rows_name_file_and_line(checkpoint, tmp_path):
    model, tok = parscale.load(checkpoint), parscale.load_tokenizer(checkpoint)
    for body, match in (('{"text": "ok"}\n{"text": 3}\n', "line 2: field 'text' must be a string, got int"),
                        ('{"text": "ok"}\n{oops\n', "line 2: not valid JSON"),
                        ('["a"]\n', "line 1: expected a JSON object")):
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(EvalDataError, match=match):
            evaluate(model, tok, tmp_path / "bad.jsonl", progress=False)


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_chat_templates_render_as_lm_eval_hf_model_renders_them(style, tmp_path):
    """`lm_eval --apply_chat_template`: the same prompts as lm-eval's `hf` model on the same tokenizer files,
    with a generation prompt, and continuing a final assistant message (a prefill) without one."""
    pytest.importorskip("accelerate")
    from hf_oracle import make_hf_model
    from lm_eval.models.huggingface import HFLM
    from test_everyday import MESSAGES, chat_folder
    from transformers import AutoTokenizer

    from parscale.analysis.lm_eval_model import ParScaleLM

    folder = chat_folder(tmp_path / "m", style)
    ours = ParScaleLM(pretrained=str(folder), batch_size=1, max_length=64)
    ref = HFLM(pretrained=make_hf_model("qwen2", tmp_path / "hf"), tokenizer=AutoTokenizer.from_pretrained(str(folder)),
               batch_size=1, max_length=64)
    history = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    prefilled = [*history, {"role": "assistant", "content": "4 "}]
    for messages, add_generation_prompt in ((history, True), (prefilled, False)):
        theirs = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == theirs
    assert ours.chat_template(True) == ref.chat_template(True) and ours.chat_template(False) is None
    assert ours.tokenizer_name == str(folder).replace("/", "__")


def test_a_continuation_that_cannot_be_scored_is_one_error(checkpoint):
    """Longer than max_length (the slice of its log-probabilities would start before the window) or empty:
    lm-eval's `hf` model asserts both; this model says which."""
    from lm_eval.api.instance import Instance

    from parscale.analysis.lm_eval_model import ParScaleLM

    lm = ParScaleLM(pretrained=str(checkpoint), batch_size=2, max_length=16)
    assert len(lm.loglikelihood([Instance("loglikelihood", {}, ("ab", "c" * 16), 0)])) == 1  # 16 tokens: fine
    for context, continuation in (("ab", "c" * 17), ("ab", "")):
        with pytest.raises(ValueError, match="cannot be scored: it needs 1 to max_length = 16"):
            lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])


def test_lm_eval_command_names_a_model_it_cannot_load(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "parscale.analysis.lm_eval_model", "--model", "parscale",
                           "--model_args", f"pretrained={tmp_path / 'none'}", "--tasks", "parscale_mc_example",
                           "--include_path", str(ROOT / "examples" / "lm_eval_tasks")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == \
        f"error: checkpoint folder '{tmp_path / 'none'}' does not exist", done.stderr[-2000:]
