"""Next-token cross-entropy through the LM head, chunk by chunk: no [tokens, vocab] logits tensor at once.

The plain path (`LossModule`, `chunk_rows = 0`) computes `lm_head(hidden)` for every token, casts the logits
to float32 and takes `F.cross_entropy`: with a 151,936-entry vocabulary and 16 × 2,048 tokens that is 5.0e9
logits, 10 GB in bf16 plus 20 GB in float32 and as much again kept for the backward pass. ParScale already
mixes its P streams before the LM head, so there is never a [B·P, T, vocab] tensor; this removes the
[B, T, vocab] one too.

`linear_cross_entropy(hidden, weight, targets, chunk_rows)` takes `chunk_rows` tokens at a time: their
logits (in the autocast dtype, as `lm_head` under autocast gives them, then float32), log-sum-exp and loss,
and at once the gradients of the mean loss with respect to the chunk's hidden states and the head's weight
(softmax minus one-hot, over the token count), cast to the matmul dtype as the plain path's backward casts
them. The backward pass only scales the stored gradients by the incoming one. Memory: one chunk's logits
plus the hidden states' gradient and a float32 gradient of the weight. The loss equals the plain path's
(float32 on CPU: to rounding; bf16 autocast: within bf16 matmul rounding, tests/test_chunked_loss.py).
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype):
        rows = hidden.shape[0]
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            h_chunk, t_chunk = h[start:end], targets[start:end]
            logits = (h_chunk @ w.T).float()  # [chunk, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_chunk[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                g.scatter_add_(1, t_chunk[:, None], torch.full_like(lse[:, None], -1.0))
                g = g.div_(rows).to(compute_dtype)  # d mean loss / d logits, in the matmul dtype
                if want_h:
                    grad_h[start:end] = (g @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (g.T @ h_chunk).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / rows

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, `chunk_rows` tokens at a time.

    hidden: [..., H] (flattened to rows); weight: [vocab, H] (the LM head's, tied or not); targets: [...] ids.
    Under CUDA autocast the matmuls run in its dtype, as `lm_head(hidden)` would."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if flat.shape[0] != ids.shape[0]:
        raise ValueError(f"{flat.shape[0]} hidden rows for {ids.shape[0]} targets")
    device_type = flat.device.type
    if device_type == "cuda" and torch.is_autocast_enabled("cuda"):
        compute_dtype = torch.get_autocast_dtype("cuda")
    else:
        compute_dtype = torch.promote_types(flat.dtype, weight.dtype)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(flat, weight, ids, chunk_rows, compute_dtype)
