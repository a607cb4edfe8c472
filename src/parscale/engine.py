"""The fast decode engine: a static KV cache and one fixed-shape decode step, replayed as a CUDA graph.

Small-batch decoding is bound by kernel launches long before it is bound by memory bandwidth
(the official implementation runs at ~100 ms/token on an H100 whatever P is). The engine removes
the launch cost: every decode step has the same shapes (the cache is read over its full length and
a `key_valid` mask hides unwritten and padded slots, see cache.StaticKVCache), so the step is
captured once in a `torch.cuda.CUDAGraph` and replayed for every token. With `compile=True` the
step is first compiled by `torch.compile` (fusing the small element-wise kernels), then captured.
Prefill runs eagerly through the flash path. Sampling stays on the device; nothing in the loop
waits for the host.

    engine = DecodeEngine(model, batch_size=1, max_len=prompt_len + new_tokens)
    logits = engine.prefill(input_ids, attention_mask)      # [B, vocab]
    logits = engine.decode(next_token)                      # [B, vocab], one step

On CPU (or with use_graph=False) the same static step runs without a graph, which is how the
tests check it against the plain path.
"""

from __future__ import annotations

import weakref

import torch

from .cache import StaticKVCache


class DecodeEngine:
    def __init__(self, model, batch_size: int, max_len: int, use_graph: bool | None = None, compile: bool = False):
        # A weak reference: the per-model engine registry below must not keep the model alive.
        self._model = weakref.ref(model)
        device = model.model.embed_tokens.weight.device
        self.batch_size, self.max_len = batch_size, max_len
        self.cache = StaticKVCache.for_model(model, batch_size, max_len)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.written = 0  # tokens in the cache, counted on the host (no device sync)

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the engine's model no longer exists")
        return model

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        logits = self.model(self.tokens, position_ids=self.positions, cache=self.cache)[:, -1]
        self.positions.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {b}")
        if t > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the engine's max_len {self.max_len}")
        self.cache.reset()
        logits = self.model(input_ids, attention_mask=attention_mask, cache=self.cache)[:, -1]
        self.cache.start_decoding(attention_mask)
        real = attention_mask.long().sum(1, keepdim=True) if attention_mask is not None else torch.full_like(
            self.positions, t)
        self.positions.copy_(real)
        self.written = t
        return logits

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return the next logits [B, vocab]."""
        if self.written >= self.max_len:
            raise ValueError(f"engine cache is full ({self.max_len} tokens)")
        self.tokens.copy_(token.view(-1, 1))
        self.written += 1
        if not self.use_graph:
            return self.step_fn()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.graph_logits

    def _capture(self) -> None:
        cache = self.cache
        saved = (cache.pos.clone(), cache.key_valid.clone(), self.positions.clone())

        def restore():
            cache.pos.copy_(saved[0])
            cache.key_valid.copy_(saved[1])
            self.positions.copy_(saved[2])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: compilation, cuBLAS handles, autotuning
                self.step_fn()
                restore()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self.step_fn()
        restore()


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_for(model, batch_size: int, max_len: int) -> DecodeEngine:
    """The model's engine for this shape, reused across calls (one kept per model)."""
    engine = _ENGINES.get(model)
    if engine is None or (engine.batch_size, engine.max_len) != (batch_size, max_len):
        engine = DecodeEngine(model, batch_size, max_len)
        _ENGINES[model] = engine
    return engine
