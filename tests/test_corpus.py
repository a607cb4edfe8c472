"""Corpus building and the data features the scaling experiment relies on: filters, dedup, package
held-out split, JSONL (compressed) sources with a split field, loader skip, evenly spaced evaluation
windows, model_overrides and data_start in training."""

import json
import lzma

import pytest
import torch

from parscale.training.corpus import CorpusError, choose_validation_packages, python_corpus, quality_problem
from parscale.training.data import DataError, TokenLoader, build_shards, iter_texts
from parscale.training.tokenizer import byte_tokenizer
from parscale.training.train import TrainConfig, train

GOOD = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"


def test_quality_filters():
    assert quality_problem(GOOD, len(GOOD)) is None
    assert quality_problem("x = 1\n", 2_000_000) == "over 1 MB"
    assert quality_problem("  \n", 3) == "empty"
    assert quality_problem("x = '" + "a" * 1001 + "'\n", 1010) == "a line over 1000 characters"
    long_lines = ("y = " + "b" * 150 + "\n") * 5
    assert quality_problem(long_lines, len(long_lines)) == "mean line length over 100"
    symbols = ("{}[]()" * 8 + "\n") * 5
    assert quality_problem(symbols, len(symbols)) == "alphanumeric share under 0.25"


def _tree(root):
    (root / "site/alpha").mkdir(parents=True)
    (root / "site/beta").mkdir(parents=True)
    (root / "site/alpha/__init__.py").write_text(GOOD)
    (root / "site/alpha/core.py").write_text(GOOD + "z = 2\n")
    (root / "site/beta/vendored.py").write_text(GOOD)  # an exact copy of alpha/__init__.py
    (root / "site/beta/bad.py").write_text("q = '" + "a" * 2000 + "'\n")
    (root / "site/single.py").write_text(GOOD + "w = 3\n")
    (root / "site/beta/latin.py").write_bytes(b"s = '\xe9'\n")
    (root / "lib/json").mkdir(parents=True)
    (root / "lib/json/__init__.py").write_text(GOOD + "j = 4\n")
    (root / "lib/site-packages/hidden").mkdir(parents=True)
    (root / "lib/site-packages/hidden/x.py").write_text(GOOD + "h = 5\n")


def test_python_corpus(tmp_path):
    _tree(tmp_path)
    out = tmp_path / "corpus.jsonl"
    totals = python_corpus([tmp_path / "site"], out, val_fraction=0.3, max_val_package=1.0,
                           stdlib_roots=[tmp_path / "lib"], progress=False)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    manifest = json.loads((tmp_path / "corpus.jsonl.manifest.json").read_text())
    assert totals["files_seen"] == 7 and totals["files_kept"] == 4  # site-packages under lib/ is not entered
    assert totals["dropped"] == {"a line over 1000 characters": 1, "duplicate": 1, "not UTF-8": 1}
    assert {d["package"] for d in docs} == {"alpha", "single", "stdlib:json"}
    dup = next(e for e in manifest["files"] if e["path"] == "beta/vendored.py")
    assert dup["dropped"].startswith("duplicate of") and dup["dropped"].endswith("alpha/__init__.py")
    # Whole packages are held out, never part of one.
    for package in {d["package"] for d in docs}:
        assert len({d["split"] for d in docs if d["package"] == package}) == 1
    assert {d["split"] for d in docs} == {"train", "val"}
    assert set(totals["val_packages"]) == {d["package"] for d in docs if d["split"] == "val"}


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="is not a folder"):
        python_corpus([tmp_path / "nope"], tmp_path / "c.jsonl", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no Python files passed"):
        python_corpus([tmp_path / "empty"], tmp_path / "c.jsonl", progress=False)
    assert not (tmp_path / "c.jsonl").exists()


def test_validation_packages_skip_huge_ones():
    sizes = {"huge": 900, **{f"p{i}": 10 for i in range(10)}}
    chosen = choose_validation_packages(sizes, val_fraction=0.03, max_val_package=0.05)
    assert "huge" not in chosen and sum(sizes[p] for p in chosen) >= 30


@pytest.fixture()
def jsonl_xz(tmp_path):
    rows = [{"text": f"document {i} " + "word " * (20 + i), "split": "val" if i % 4 == 0 else "train"}
            for i in range(40)]
    path = tmp_path / "docs.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


def test_split_field_and_compressed_jsonl(tmp_path, jsonl_xz):
    path, rows = jsonl_xz
    tok = byte_tokenizer()
    m = build_shards([path], tmp_path / "data", tok, split_field="split", progress=False)
    expect_val = sum(len(tok.encode(r["text"]).ids) + 1 for r in rows if r["split"] == "val")
    assert m["val_tokens"] == expect_val and m["val_documents"] == 10 and m["split_field"] == "split"
    # The tokenizer-training texts skip held-out documents.
    texts = list(iter_texts([path], split_field="split"))
    assert len(texts) == 30 and all(not t.startswith("document 0 ") for t in texts)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "split": "test"}) + "\n")
    with pytest.raises(DataError, match="not 'train' or 'val'"):
        build_shards([bad], tmp_path / "bad", tok, split_field="split", progress=False)
    # every row labelled train: no row is moved to validation against its label
    bad.write_text("".join(json.dumps({"text": f"doc {i}", "split": "train"}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match="no row has 'split' = 'val'"):
        build_shards([bad], tmp_path / "bad", tok, split_field="split", progress=False)
    assert not (tmp_path / "bad").exists()


def test_loader_skip_and_spread_windows(tmp_path, jsonl_xz):
    path, _ = jsonl_xz
    build_shards([path], tmp_path / "data", byte_tokenizer(), split_field="split", progress=False)
    a = TokenLoader(tmp_path / "data", "train", 2, 16, seed=3)
    batches = [a.next_batch()[0] for _ in range(40)]  # crosses an epoch boundary
    b = TokenLoader(tmp_path / "data", "train", 2, 16, seed=3)
    b.skip(2 * 25)
    for i in range(25, 40):
        assert torch.equal(b.next_batch()[0], batches[i])
    val = TokenLoader(tmp_path / "data", "val", 2, 16)
    firsts = [x[0, 0].item() for x, _ in val.windows(limit=4)]
    starts = [i * val.n_windows // 4 for i in range(4)]
    assert firsts == [int(val.tokens[s * 16]) for s in starts[::2]]  # first row of each batch of 2
    assert sum(x.shape[0] for x, _ in val.windows(limit=4)) == 4


def test_model_overrides_and_data_start(tmp_path, jsonl_xz):
    path, _ = jsonl_xz
    build_shards([path], tmp_path / "data", byte_tokenizer(), split_field="split", progress=False)
    cfg = dict(model="tiny", model_overrides={"hidden_size": 48, "intermediate_size": 96}, streams=2,
               data=str(tmp_path / "data"), steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1,
               save_every=0, progress=False)
    train(TrainConfig(**cfg, out=str(tmp_path / "a")))
    saved = json.loads((tmp_path / "a/checkpoints/latest/model/config.json").read_text())
    assert saved["hidden_size"] == 48 and saved["intermediate_size"] == 96 and saved["parscale_n"] == 2
    with pytest.raises(ValueError, match="unknown model settings hidden_sise"):
        train(TrainConfig(**{**cfg, "model_overrides": {"hidden_sise": 48}}, out=str(tmp_path / "b")))
    # data_start = the windows an earlier run consumed: the same seed then continues with new windows.
    first = [json.loads(line)["loss"] for line in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    train(TrainConfig(**{**cfg, "steps": 4}, out=str(tmp_path / "c")))
    train(TrainConfig(**{**cfg, "data_start": 4}, out=str(tmp_path / "d")))
    full = [json.loads(line)["loss"] for line in (tmp_path / "c/metrics.jsonl").read_text().splitlines()]
    moved = [json.loads(line)["loss"] for line in (tmp_path / "d/metrics.jsonl").read_text().splitlines()]
    assert first == full[:2] and moved[0] != full[0]
