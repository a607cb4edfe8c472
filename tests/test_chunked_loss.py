"""The chunked LM-head cross-entropy equals the plain path (lm_head, float32 logits, F.cross_entropy): loss and
gradients of the hidden states and of the head's weight, tied or not, for chunk sizes that do and do not
divide the token count; and a training run with it equals one without, step for step."""

import pytest
import torch
import torch.nn.functional as F

from parscale.training.chunked_loss import linear_cross_entropy


def plain(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float().flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_loss_and_gradients_equal_the_plain_path(chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 32, generator=g, requires_grad=True)
    weight = (torch.randn(300, 32, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, 300, (3, 21), generator=g)
    ref = plain(hidden, weight, targets)
    ref_grads = torch.autograd.grad(ref * 2.5, (hidden, weight))  # a scaled loss: the backward's factor counts
    out = linear_cross_entropy(hidden, weight, targets, chunk_rows)
    grads = torch.autograd.grad(out * 2.5, (hidden, weight))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight = torch.randn(10, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (10,))
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, targets, 3)
    torch.testing.assert_close(out, plain(hidden[None], weight, targets[None]))


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="4 hidden rows for 5 targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long), 2)


@pytest.mark.parametrize("tied", [True, False])
def test_a_training_run_with_chunks_equals_one_without(data_dir, tmp_path, tied):
    """Same seed, same data: every step's loss agrees (float32 on CPU), tied and untied heads, P = 4, 100-token
    chunks of 4 x 32 tokens (a last chunk of 28)."""
    import json

    from parscale.training.train import TrainConfig, train

    losses = {}
    for chunk in (0, 100):
        out = tmp_path / f"run-{chunk}"
        train(TrainConfig(model="tiny", streams=4, n_tokens=4, data=str(data_dir), out=str(out), steps=6,
                          batch_size=4, seq_len=32, eval_every=0, save_every=0, progress=False, device="cpu",
                          loss_chunk_rows=chunk, model_overrides={"tie_word_embeddings": tied}))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[chunk] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[0]) >= 6
    assert losses[100] == pytest.approx(losses[0], rel=1e-5)
