"""Stream diagnostics: they tell collapsed streams from diverse ones, and each number is what it claims."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from parscale.analysis.streams import stream_diagnostics


def _batches(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 512, (3, 10), generator=g), torch.randint(0, 512, (3, 10), generator=g))
            for _ in range(n)]


def test_collapsed_streams_read_as_collapsed():
    model = tiny_model(streams=4)
    with torch.no_grad():
        for layer in model.model.layers:
            for prefix in (layer.self_attn.prefix_k, layer.self_attn.prefix_v):
                prefix.copy_(prefix[0:1].expand_as(prefix))
    d = stream_diagnostics(model, _batches())
    assert d["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert all(c == pytest.approx(1.0, abs=1e-5) for c in d["hidden_cosine"])
    assert d["loss_stream"] == pytest.approx([d["loss_mix"]] * 4, abs=1e-5)
    assert d["loss_ensemble"] == pytest.approx(d["loss_mix"], abs=1e-5)
    assert d["loss_shared_prefix"] == pytest.approx(d["loss_mix"], abs=1e-6)


def test_each_number_matches_a_direct_computation():
    model = tiny_model(streams=3)
    batches = _batches(1, n=1)
    d = stream_diagnostics(model, batches)
    x, y = batches[0]
    streams = model.forward_streams(x)
    logp = torch.stack([model.lm_head(s).log_softmax(-1) for s in streams])
    nll = -logp.gather(-1, y[None, ..., None].expand(3, *y.shape, 1)).squeeze(-1)
    assert d["loss_stream"] == pytest.approx(nll.mean((1, 2)).tolist(), rel=1e-5)
    ens = -(torch.logsumexp(-nll, 0) - math.log(3)).mean()
    assert d["loss_ensemble"] == pytest.approx(ens.item(), rel=1e-5)
    kl01 = (logp[0].exp() * (logp[0] - logp[1])).sum(-1).mean()
    assert d["kl_pairwise"][0][1] == pytest.approx(kl01.item(), rel=1e-5) and d["kl_mean"] > 0
    assert d["loss_mix"] == pytest.approx(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item(), rel=1e-5)
    _, w = model.forward_hidden(x)
    assert d["weight_mean"] == pytest.approx(w.mean((0, 1)).tolist(), rel=1e-5)
    assert 0 < d["weight_entropy"] <= math.log(3) + 1e-6
    before = [p.clone() for p in model.parameters()]
    assert d["loss_shared_prefix"] != pytest.approx(d["loss_mix"], abs=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # prefixes restored


def test_logits_are_taken_a_chunk_of_tokens_at_a_time(monkeypatch):
    """Every vocabulary-sized quantity is computed over chunks of tokens, none larger than the logit budget
    allows (a [P, B, T, vocab] tensor at once ran a recycled 49k-vocabulary model out of GPU memory), and the
    numbers equal the whole-batch ones, the hidden cosine included."""
    from parscale.analysis import streams as streams_module

    model = tiny_model(streams=3)
    batches = _batches(2, n=2)
    whole = stream_diagnostics(model, batches)
    vocab = model.config.vocab_size
    monkeypatch.setattr(streams_module, "LOGIT_ELEMENTS", 7 * 3 * vocab)  # 7 tokens of 3 streams: 30 = 4 x 7 + 2
    rows = []
    hook = model.lm_head.register_forward_hook(lambda _m, inputs, _o: rows.append(inputs[0].shape[:-1].numel()))
    chunked = stream_diagnostics(model, batches)
    hook.remove()
    assert max(rows) <= 7 * 3 and min(rows) >= 1
    for key in ("loss_mix", "loss_stream", "loss_ensemble", "kl_mean", "loss_shared_prefix", "hidden_cosine"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    x = torch.cat([b[0] for b in batches])
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o)) for layer in model.model.layers]
    with torch.no_grad():
        model.forward_streams(x)
    for h in hooks:
        h.remove()
    hs = F.normalize(outs[-1].view(3, -1, outs[-1].shape[-1]), dim=-1)
    direct = torch.stack([(hs[i] * hs[j]).sum(-1).mean() for i, j in ((0, 1), (0, 2), (1, 2))]).mean()
    assert whole["hidden_cosine"][-1] == pytest.approx(direct.item(), rel=1e-5)


def test_floor_and_cap_shares():
    model = tiny_model(streams=4)
    with torch.no_grad():
        model.model.aggregate_layer[2].weight.zero_()
        model.model.aggregate_layer[2].bias.copy_(torch.tensor([60.0, 0, 0, 0]))
    d = stream_diagnostics(model, _batches(), shared_prefix=False)
    assert d["cap_share"] == 1.0 and d["floor_share"] == pytest.approx(0.75)
    assert d["weight_mean"][0] == pytest.approx(0.9 + 0.025, abs=1e-6)


def test_training_logs_and_cli_writes_diagnostics(data_dir, tmp_path, capsys):
    from test_train import _cfg

    from parscale.cli import main
    from parscale.training.train import train

    train(_cfg(data_dir, tmp_path / "run", streams=2, steps=4, eval_every=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert len(evals) == 2 and all(len(r["streams"]["loss_stream"]) == 2 for r in evals)
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["streams", "--model", str(tmp_path / "run"), "--data", str(data_dir), "--batches", "2",
                 "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--plot", str(plot)]) == 0
    d = json.loads(out.read_text())
    assert d["parscale_n"] == 2 and len(d["hidden_cosine"]) == 2 and plot.stat().st_size > 0
    assert "each stream alone" in capsys.readouterr().out
    # the validation shard itself (uint16 ids on disk) gives the same windows, so the same diagnostics
    assert main(["streams", "--model", str(tmp_path / "run"), "--data", str(data_dir / "val.bin"), "--batches", "2",
                 "--batch-size", "2", "--seq-len", "32", "--out", str(tmp_path / "bin.json")]) == 0
    from_shard = json.loads((tmp_path / "bin.json").read_text())
    assert from_shard["loss_stream"] == pytest.approx(d["loss_stream"], abs=1e-6), "not the folder's windows"
    for flags, message in ((["--seq-len", "513"], "--seq-len must be between 1 and the model's 512 positions"),
                           (["--batches", "0"], "--batches and --batch-size must be at least 1"),
                           (["--out", str(tmp_path)], "is a folder, not a file"),
                           (["--plot", str(tmp_path)], "is a folder, not a file")):
        assert main(["streams", "--model", str(tmp_path / "run"), "--data", str(data_dir), *flags]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(("diag", "label"), [
    ({"parscale_n": 4, "cap_share": 0.9, "kl_mean": 1.2, "loss_best_stream": 2.31, "loss_mix": 2.30}, "collapsed"),
    ({"parscale_n": 4, "cap_share": 0.01, "kl_mean": 0.0012, "loss_best_stream": 5.37, "loss_mix": 5.37}, "alike"),
    ({"parscale_n": 8, "cap_share": 0.02, "kl_mean": 2.1, "loss_best_stream": 2.8, "loss_mix": 2.26}, "specialised"),
    ({"parscale_n": 1, "loss_mix": 2.3}, "single")])
def test_the_streams_verdict_follows_its_documented_thresholds(diag, label):
    from parscale.analysis.streams import verdict

    got, line = verdict(diag)
    assert got == label and line.startswith(label if label != "single" else "one stream")
