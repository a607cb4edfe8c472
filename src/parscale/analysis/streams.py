"""Stream diagnostics: are the P streams of a model used, and used differently?

    parscale streams --model DIR --data DATA_DIR_OR_TEXT [--batches 8 --seq-len 512] --out streams.json

`stream_diagnostics(model, batches)` measures, token-weighted over held-out windows (x, y):
- `loss_mix`: the model's loss (the learned aggregation);
- `loss_stream`: the loss of each stream alone (its final hidden state through the LM head);
- `loss_ensemble`: the loss of the uniform probability ensemble of the streams — when the learned mix
  is no better than this, the aggregator adds nothing beyond averaging;
- `kl_pairwise`: mean KL(p_i ‖ p_j) between the streams' next-token distributions, per pair, and
  its mean: near 0 means the streams collapsed onto one function;
- `hidden_cosine`: mean cosine between streams' hidden states after every layer (mean over pairs);
- `weight_mean`, `weight_entropy` (ln P = uniform), `floor_share` (share of token-stream weights
  within 5% of the ε/P floor, i.e. streams switched off) and `cap_share` (share of tokens whose
  largest weight is within 1% of the cap 1 − ε + ε/P, i.e. one stream takes all it can);
- `loss_shared_prefix`: the loss when every stream is given stream 0's prefix. The streams then compute
  one function, so this equals stream 0 alone (`loss_stream[0]`); a difference means the streams are
  not isolated from each other (a layout bug), which is why it is kept.
For P = 1 (also the prefix control) only `loss_mix` is defined.

`verdict(diag)` reads these in one line, with fixed thresholds:
- **collapsed**: one stream takes the largest weight the ε smoothing allows on more than half of the tokens
  (`cap_share` > 0.5): the model is, in effect, that one stream;
- **alike**: otherwise, if the streams' next-token distributions barely differ (`kl_mean` < 0.05 nats): P
  copies of one function, whatever the weights say;
- **specialised**: otherwise: the streams differ, and the line says by how much the mix beats its best
  stream alone (the aggregator's work).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import combinations

import torch
import torch.nn.functional as F

# The most logits (floats) held at once: the vocabulary-sized quantities are computed a chunk of tokens at a
# time. 2^26 float32 logits are 256 MiB; at P = 8, 16 x 1,024 tokens and a 49,152-entry vocabulary the whole
# batch at once was 25.8 GB (an out-of-memory error beside other runs on one GPU).
LOGIT_ELEMENTS = 1 << 26


@torch.no_grad()
def stream_diagnostics(model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], shared_prefix: bool = True
                       ) -> dict:
    """Diagnostics of the model's streams over batches of (inputs, targets) [B, T]; see the module docstring."""
    cfg = model.config
    p, eps = cfg.parscale_n, cfg.parscale_attn_smooth
    device = model.model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    sums: dict = {}
    n_tokens = 0

    def add(key, value, weight):
        sums[key] = sums.get(key, 0.0) + value * weight

    # Each layer's mean pairwise cosine between the streams' hidden states, taken as the layer runs: holding
    # every layer's output until the end would keep layers x P x B x T x H values. Only the batch's first
    # forward is measured (the shared-prefix forward after it finds the list full).
    layer_cos: list[torch.Tensor] = []
    n_layers = len(model.model.layers)

    def mean_pairwise_cosine(_module, _inputs, out):
        if p > 1 and len(layer_cos) < n_layers:
            hs = F.normalize(out.float().view(p, -1, out.shape[-1]), dim=-1)
            layer_cos.append(torch.stack([(hs[i] * hs[j]).sum(-1).mean() for i, j in combinations(range(p), 2)])
                             .mean())

    hooks = [layer.register_forward_hook(mean_pairwise_cosine) for layer in model.model.layers]
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            tokens = y.numel()
            n_tokens += tokens
            layer_cos.clear()
            streams = model.forward_streams(x)  # [P, B, T, H]
            if p == 1:
                add("loss_mix", _cross_entropy_sum(model, streams[0], y), 1)
                continue
            mixed, w = model.aggregate(streams)
            add("loss_mix", _cross_entropy_sum(model, mixed, y), 1)
            _add_vocabulary_sums(model, streams.flatten(1, 2), y.flatten(), add)
            for layer_i, cos in enumerate(layer_cos):
                add(f"cos_{layer_i}", cos.item(), tokens)
            wf = w.float()
            for i in range(p):
                add(f"w_{i}", wf[..., i].mean().item(), tokens)
            add("weight_entropy", (-(wf * wf.clamp_min(1e-12).log()).sum(-1)).mean().item(), tokens)
            floor, cap = eps / p, 1 - eps + eps / p
            add("floor_share", (wf <= floor * 1.05).float().mean().item(), tokens)
            add("cap_share", (wf.max(-1).values >= cap * 0.99).float().mean().item(), tokens)
            if shared_prefix:
                add("loss_shared_prefix", _loss_with_shared_prefix(model, x, y), 1)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n_tokens == 0:
        raise ValueError("stream diagnostics need at least one batch")
    mean = {k: v / n_tokens for k, v in sums.items()}
    out = {"parscale_n": p, "tokens": n_tokens, "loss_mix": mean["loss_mix"]}
    if p == 1:
        return out
    out["loss_stream"] = [mean[f"loss_stream_{i}"] for i in range(p)]
    out["loss_best_stream"] = min(out["loss_stream"])
    out["loss_ensemble"] = mean["loss_ensemble"]
    out["kl_pairwise"] = [[0.0 if i == j else mean[f"kl_{i}_{j}"] for j in range(p)] for i in range(p)]
    out["kl_mean"] = sum(mean[f"kl_{i}_{j}"] for i in range(p) for j in range(p) if i != j) / (p * (p - 1))
    out["hidden_cosine"] = [mean[f"cos_{i}"] for i in range(cfg.num_hidden_layers)]
    out["weight_mean"] = [mean[f"w_{i}"] for i in range(p)]
    for key in ("weight_entropy", "floor_share", "cap_share"):
        out[key] = mean[key]
    out["weight_entropy_uniform"] = math.log(p)
    if shared_prefix:
        out["loss_shared_prefix"] = mean["loss_shared_prefix"]
    return out


def _token_chunks(n_tokens: int, per_token: int):
    """Slices of at most LOGIT_ELEMENTS // per_token tokens (at least one) covering n_tokens."""
    size = max(1, LOGIT_ELEMENTS // per_token)
    return (slice(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size))


def _cross_entropy_sum(model, hidden: torch.Tensor, y: torch.Tensor) -> float:
    """Summed next-token loss of hidden states [..., H] against targets [...], through the LM head a chunk of
    tokens at a time."""
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1)
    total = 0.0
    for part in _token_chunks(ids.numel(), model.config.vocab_size):
        logits = model.lm_head(flat[part]).float()
        total += F.cross_entropy(logits, ids[part], reduction="sum").item()
    return total


def _add_vocabulary_sums(model, streams: torch.Tensor, y: torch.Tensor, add) -> None:
    """Each stream's loss, the uniform ensemble's and every ordered pair's KL, summed over tokens, from the
    streams' hidden states [P, N, H] and targets [N], a chunk of tokens at a time (P x chunk x vocab floats)."""
    p = streams.shape[0]
    for part in _token_chunks(y.numel(), p * model.config.vocab_size):
        logp = torch.stack([model.lm_head(streams[i, part]).float().log_softmax(-1) for i in range(p)])  # [P,n,V]
        target = y[part][None, :, None].expand(p, -1, 1)
        nll = -logp.gather(-1, target).squeeze(-1)  # [P, n]
        for i in range(p):
            add(f"loss_stream_{i}", nll[i].sum().item(), 1)
        add("loss_ensemble", -(torch.logsumexp(-nll, dim=0) - math.log(p)).sum().item(), 1)
        for i, j in combinations(range(p), 2):
            add(f"kl_{i}_{j}", (logp[i].exp() * (logp[i] - logp[j])).sum().item(), 1)
            add(f"kl_{j}_{i}", (logp[j].exp() * (logp[j] - logp[i])).sum().item(), 1)


def _loss_with_shared_prefix(model, x, y) -> float:
    """The model's summed loss with every stream's prefix replaced by stream 0's (restored afterwards)."""
    saved = []
    for layer in model.model.layers:
        attn = layer.self_attn
        for prefix in (attn.prefix_k, attn.prefix_v):
            saved.append((prefix, prefix.detach().clone()))
            prefix.copy_(prefix[0:1].expand_as(prefix))
    try:
        hidden, _ = model.forward_hidden(x)
        return _cross_entropy_sum(model, hidden, y)
    finally:
        for prefix, value in saved:
            prefix.copy_(value)


def plot_diagnostics(diag: dict, path) -> None:
    """Per-stream loss against the mix, ensemble and shared-prefix losses; hidden cosine per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    p = diag["parscale_n"]
    a.bar(range(p), diag["loss_stream"], color="0.7", label="stream alone")
    for key, style in (("loss_mix", "-"), ("loss_ensemble", "--"), ("loss_shared_prefix", ":")):
        if key in diag:
            a.axhline(diag[key], ls=style, color="k" if key == "loss_mix" else "C1" if "ens" in key else "C3",
                      label=key.removeprefix("loss_").replace("_", " "))
    a.set_xlabel("stream")
    a.set_xticks(range(p))
    a.set_ylabel("held-out loss (nats per token)")
    a.set_ylim(min(diag["loss_mix"], min(diag["loss_stream"])) - 0.1, max(diag["loss_stream"]) + 0.1)
    a.legend(fontsize=8)
    b.plot(range(1, len(diag["hidden_cosine"]) + 1), diag["hidden_cosine"], "o-")
    b.set_xlabel("layer")
    b.set_xticks(range(1, len(diag["hidden_cosine"]) + 1))
    b.set_ylabel("mean cosine between streams")
    b.set_ylim(0, 1.02)
    b.grid(alpha=0.3)
    fig.suptitle(f"P = {p}: KL between streams {diag['kl_mean']:.3f} nats, weight entropy "
                 f"{diag['weight_entropy']:.3f} / {diag['weight_entropy_uniform']:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLLAPSED_CAP_SHARE = 0.5
ALIKE_KL_NATS = 0.05


def verdict(diag: dict) -> tuple[str, str]:
    """(collapsed | alike | specialised | single, one readable line): see the module docstring."""
    if diag.get("parscale_n", 1) == 1:
        return "single", "one stream: nothing to compare"
    gain = diag["loss_best_stream"] - diag["loss_mix"]
    if diag["cap_share"] > COLLAPSED_CAP_SHARE:
        return "collapsed", (f"collapsed: one stream takes the largest weight allowed on {diag['cap_share']:.0%} of "
                             f"the tokens (> {COLLAPSED_CAP_SHARE:.0%}); the mix is {gain:+.3f} nats from its best "
                             f"stream")
    if diag["kl_mean"] < ALIKE_KL_NATS:
        return "alike", (f"alike: KL between streams {diag['kl_mean']:.4f} nats (< {ALIKE_KL_NATS}): the streams "
                         f"compute nearly the same function")
    return "specialised", (f"specialised: KL between streams {diag['kl_mean']:.3f} nats; the mix is {gain:.3f} nats "
                           f"better than its best stream alone")

