"""Levers against stream collapse: each does what it says in training and nothing at evaluation."""

import json

import pytest
import torch
from conftest import tiny_model
from test_train import _cfg

from parscale.training.levers import AggregatorHooks
from parscale.training.train import (
    TrainConfig,
    build_optimizer,
    check_config,
    group_schedules,
    lr_factor,
    optimizer_schedules,
    train,
)


def test_parscale_groups_get_their_own_rate_and_warmup():
    model = tiny_model(streams=2)
    cfg = TrainConfig(lr=1e-3, warmup=4, steps=20, parscale_lr_mult=0.1, parscale_warmup=10)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert len(groups) == 4 and all(("prefix" in n or "aggregate" in n) for g in groups[2:] for n in g)
    assert not any(("prefix" in n or "aggregate" in n) for g in groups[:2] for n in g)
    schedules = group_schedules(cfg, 4)
    assert schedules[0](2) == pytest.approx(lr_factor(cfg, 2)) == pytest.approx(3 / 4)
    assert schedules[2](2) == pytest.approx(0.1 * 3 / 10)  # its own warm-up, scaled
    assert len(build_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups) == 2  # off: as before


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])])
def test_the_aggregator_gets_a_rate_of_its_own(device):
    """aggregator_lr_mult: the aggregator in groups 4 and 5 at lr × parscale_lr_mult × the multiple, the
    prefixes keep theirs; Adam's first step moves each weight by its group's rate, so the moves show it. On
    CUDA the trainer's fused AdamW takes the same groups."""
    torch.manual_seed(0)
    model = tiny_model(streams=2).to(device)
    cfg = TrainConfig(lr=1e-2, warmup=1, steps=10, weight_decay=0.0, parscale_lr_mult=0.5, aggregator_lr_mult=1e-3)
    opt = build_optimizer(model, cfg, torch.device(device), fused=device == "cuda")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["schedule"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0, 1, 3, 4, 5}   # group 2 (decayed prefixes) is empty: prefixes are not decayed
    assert groups[4] | groups[5] == {n for n, _ in model.named_parameters() if "aggregate_layer" in n}
    assert groups[3] == {n for n, _ in model.named_parameters() if "prefix" in n}
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, optimizer_schedules(cfg, opt))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 9), device=device)
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    schedule.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["model.aggregate_layer.2.bias"] == pytest.approx(1e-2 * 0.5 * 1e-3, rel=1e-2)
    assert moved["model.layers.0.self_attn.prefix_k"] == pytest.approx(1e-2 * 0.5, rel=1e-2)
    assert moved["model.embed_tokens.weight"] == pytest.approx(1e-2, rel=1e-2)
    with pytest.raises(ValueError, match="aggregator_lr_mult"):
        check_config(TrainConfig(aggregator_lr_mult=0.0))


def test_stream_dropout_masks_in_training_only():
    model = tiny_model(streams=4)
    ids = torch.randint(0, 512, (2, 9))
    ref_hidden, ref_w = model.forward_hidden(ids)
    hooks = AggregatorHooks(model, stream_dropout=0.5)
    model.eval()
    hidden, w = model.forward_hidden(ids)
    assert torch.equal(hidden, ref_hidden)  # evaluation is untouched
    model.train()
    torch.manual_seed(0)
    _, w = model.forward_hidden(ids)
    floor = 0.1 / 4
    at_floor = (w - floor).abs() < 1e-6
    assert at_floor.any() and not at_floor.all(-1).any()  # some streams dropped, never all of a token's
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 9))
    hooks.remove()
    _, w = model.forward_hidden(ids)
    torch.testing.assert_close(w, ref_w)


def test_z_loss_is_added_and_reaches_the_aggregator():
    from parscale.training.distributed import LossModule

    model = tiny_model(streams=2).train()
    x, y = torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))
    plain, _ = LossModule(model, autocast=False)(x, y)
    hooks = AggregatorHooks(model, z_loss=0.01)
    with_z, _ = LossModule(model, autocast=False, hooks=hooks)(x, y)
    logits = model.model.aggregate_layer(model.forward_streams(x).permute(1, 2, 3, 0).reshape(2, 8, -1))
    expected = 0.01 * torch.logsumexp(logits, -1).pow(2).mean()
    assert (with_z - plain).item() == pytest.approx(expected.item(), rel=1e-4)
    with_z.backward()
    assert model.model.aggregate_layer[2].weight.grad.abs().sum() > 0


def test_levers_train_end_to_end(data_dir, tmp_path):
    train(_cfg(data_dir, tmp_path / "r", streams=4, steps=4, stream_dropout=0.2, aggregator_z_loss=1e-3,
               parscale_lr_mult=0.5, parscale_warmup=2, aggregator_lr_mult=0.1))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["loss"] > 0 for r in rows)
    with pytest.raises(ValueError, match="need P > 1"):
        train(_cfg(data_dir, tmp_path / "p1", streams=1, stream_dropout=0.2))


@pytest.mark.parametrize("rates", [{"aggregator_lr_mult": 0.1}, {"parscale_lr_mult": 0.5}])
def test_a_frozen_backbone_with_a_rate_of_its_own_resumes_exactly(data_dir, tmp_path, rates):
    """A frozen backbone with ParScale or aggregator rates of their own leaves the backbone's two optimizer groups
    empty; a run stopped and resumed must still equal the uninterrupted one (the optimizer state of the non-empty
    groups restored)."""
    kw = dict(streams=4, trainable="parscale", eval_every=0, **rates)
    train(_cfg(data_dir, tmp_path / "full", **kw))
    train(_cfg(data_dir, tmp_path / "part", **kw), stop_after=5)
    train(_cfg(data_dir, tmp_path / "part", **kw), resume=True)
    read = [[json.loads(line)["loss"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("full", "part")]
    assert len(read[0]) == 12 and read[1] == read[0]
