"""The fast decode engine: the model's static KV cache and one fixed-shape decode step, replayed as a CUDA graph.

Small-batch decoding is bound by kernel launches long before it is bound by memory bandwidth
(the official implementation runs at ~100 ms/token on an H100 whatever P is). The engine removes
the launch cost: every decode step has the same shapes (the cache is read over its full length and
a `key_valid` mask hides unwritten and padded slots, see cache.StaticKVCache), so the step is
captured once in a `torch.cuda.CUDAGraph` and replayed for every token. With `compile=True` the
step is first compiled by `torch.compile` (fusing the small element-wise kernels), then captured.
Prefill runs through a captured graph of the padded prompt (below) or eagerly through the flash path.
Sampling stays on the device; nothing in the loop waits for the host.

    engine = engine_for(model)                                # one engine per model, reused
    logits = engine.prefill(input_ids, attention_mask, max_new_tokens=64)   # [B, vocab]
    logits = engine.decode(next_token)                        # [B, vocab], one step

State lives in one place. The cache is the model's own (`model.setup_cache`): it grows only, so
prompts of every length share it and share one captured graph, and each request rewrites its
prefix slots from the live parameters. A captured graph reads fixed addresses, so it is dropped
and captured again whenever the cache or any parameter or buffer of the model was replaced
(`load_state_dict(assign=True)`, `.to(dtype)`, moving devices); in-place updates (an optimizer step,
`copy_`) need nothing, since the graph reads the same memory.

On CPU (or with use_graph=False) the same static step runs without a graph, which is how the
tests check it against the plain path.

Padded prefill (`padded_prefill`, on by default for the graph engine) removes the same launch cost from
the prompt: it is left-padded to the smallest of 64, 128, 256, ... tokens that holds it (the mask hides
the padding and positions count real tokens only, so the logits are those of the unpadded prompt) and
run through one CUDA graph per such length, all sharing one memory pool. The padding takes cache slots,
not positions. Measured on an H200 (1.6B shape, batch 1, benchmarks/README.md): a 64-token prompt takes
7.5 ms instead of 26.8 (P = 1) and 13.6 instead of 43.6 (P = 8); at 512 tokens and P = 8 the prompt is
compute-bound and the two are alike (41.6 / 40.6 ms), so prompts of P · B · padded length ≥ 4,096 rows
are prefilled eagerly (`pads`); the graphs' pool adds up to 0.2 GiB. Without
graphs (CPU, use_graph=False) or with `compile=True` it stays off unless asked for. Asked for with
`compile=True`, the padded prompt's forward is compiled as the decode step is (one compilation per padded
length and batch) and then captured: on the H200 a 64-token prompt takes 3.4 ms (P = 1) and 7.6 (P = 8)
against 24-28 eager on the compiled engine, but each padded length costs ~30 s of compiling the first time
it is used, which is why it is not the compiled engine's default.

Bounded reads (`bounded_reads`, on by default for the graph engine) make a step read only the first
`read_len` slots of the cache, the smallest of 256, 512, 1024, ... (capped at max_len) that holds every
token written so far, instead of all max_len: one graph per such length, captured when first needed, so
a short conversation in a long cache reads a short cache. The host knows how many tokens were written,
so choosing the length costs no device sync. Measured on an H200 (1.6B shape, batch 1, 64 + 64 tokens,
benchmarks/README.md): in a 4,096-token cache a step costs +0.2–0.3% over a 128-token cache with them and
+5% (P = 1) / +11% (P = 8) without (graph engine); with the compiled engine −1% with them and +10% / +23%
without. With `compile=True` they stay off unless asked for: each read length is its own compilation
there (34–54 s at the 1.6B shape), paid when a conversation first crosses it.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from parscale.inference.class_swap import note_classes


class DecodeEngine:
    READ_STEP = 256  # the shortest bounded read; each longer one doubles it
    PREFILL_STEP = 64  # the shortest padded prompt; each longer one doubles it
    # From P · B · padded length = 4,096 rows on, a prompt is compute-bound: measured on an H200 (1.6B, P = 8,
    # 512 tokens) the captured prefill took 41.6 ms against 40.6 eager, while its graph pool would keep the
    # prompt's activations reserved. Such prompts are prefilled eagerly, unpadded.
    PREFILL_GRAPH_MAX_ROWS = 4096

    def __init__(self, model, batch_size: int = 1, max_len: int = 256, use_graph: bool | None = None,
                 compile: bool = False, bounded_reads: bool | None = None, padded_prefill: bool | None = None):
        # A weak reference: the per-model engine registry below must not keep the model alive.
        self._model = weakref.ref(model)
        device = model.model.embed_tokens.weight.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if compile and device.type == "cuda":
            from parscale.inference.quantize import is_quantized

            if is_quantized(model):
                warnings.warn("int8 weights save memory, not time: with the compiled engine they were measured "
                              "1.17x (P = 1) and 5.4x (P = 8, batch 1) slower per token than bf16 compiled "
                              "(1.6B shape, one H200, benchmarks/README.md)", stacklevel=2)
        self.compiled = compile
        self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile else self._step
        # The padded prompt's forward, compiled too with compile=True (one compilation per padded length and
        # batch, each then captured like the eager one): fused element-wise kernels, fewer of them per layer.
        self.prefill_fn = (torch.compile(self._padded_forward, fullgraph=True, dynamic=False) if compile
                           else self._padded_forward)
        self.bounded_reads = (not compile) if bounded_reads is None else bounded_reads
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # read_len -> graph, its logits
        self.padded_prefill = self.resolved_padded_prefill(device, compile, padded_prefill, self.use_graph)
        # padded prompt length -> graph, its input ids and mask buffers, its logits
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._prefill_pool = None
        self._prefill_captured_for: tuple | None = None
        self.prefill_captures = 0
        self.captures = 0  # how many times a graph was captured (tests and benchmarks read it)
        self._captured_for: tuple | None = None
        self.cache = None
        self.reserve(batch_size, max_len)

    @staticmethod
    def resolved_padded_prefill(device, compile: bool, padded_prefill: bool | None, use_graph: bool | None = None):
        """padded_prefill as asked, or its default: on with graphs (CUDA unless use_graph says otherwise), off
        compiled (see the module docstring)."""
        if padded_prefill is not None:
            return padded_prefill
        return (device.type == "cuda" if use_graph is None else use_graph) and not compile

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the engine's model no longer exists")
        return model

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def reserve(self, batch_size: int, max_len: int) -> None:
        """Make room for a request of batch_size rows and max_len tokens (prompt + new)."""
        cache = self.model.setup_cache(batch_size, max_len)
        if cache is not self.cache:
            self.cache = cache
            device = cache.device
            self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.graphs = {}
            self._drop_prefill_graphs()
        self.written = 0  # tokens in the cache, counted on the host (no device sync)

    def _fingerprint(self) -> tuple:
        """What a captured graph depends on: the cache's, every parameter's and buffer's addresses, the code
        its modules run (a class swapped from outside, e.g. inference/skinny_matmul.py, changes the kernels) and
        how parscale's kernels launch (PDL, inference/triton_support.py)."""
        from parscale.inference.triton_support import pdl_requested

        model = self.model
        return (id(self.cache), tuple(t.data_ptr() for t in model.parameters()),
                tuple(t.data_ptr() for t in model.buffers()), tuple(type(m) for m in model.modules()),
                pdl_requested())

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        logits = self.model.last_logits(self.tokens, position_ids=self.positions, cache=self.cache)
        self.positions.add_(1)
        return logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                max_new_tokens: int = 0) -> torch.Tensor:
        """Start a request: reset the cache (prefixes from the live parameters), run the prompt."""
        b, t = input_ids.shape
        padded = self.padded_prefill and self.pads(b, t)
        length = self.prefill_len_for(t) if padded else t
        self.reserve(b, length + max_new_tokens)
        if length > self.max_len:
            raise ValueError(f"prompt of {t} tokens exceeds the engine's max_len {self.max_len}")
        model = self.model
        if self.compiled:  # a class swapped since the step was compiled: have it traced again (class_swap.py)
            note_classes(model)
        self.cache.reset(model)
        if padded:
            input_ids, attention_mask = _left_pad(input_ids, attention_mask, length)
            logits = self._padded_prefill(input_ids, attention_mask)
        else:
            logits = model.last_logits(input_ids, attention_mask=attention_mask, cache=self.cache)
        self.cache.start_decoding(attention_mask)
        real = attention_mask.long().sum(1, keepdim=True) if attention_mask is not None else torch.full_like(
            self.positions, t)
        self.positions.copy_(real)
        self.written = length
        if self.graphs and self._captured_for != self._fingerprint():
            self.graphs = {}  # parameters or buffers were replaced: capture again
        return logits

    def pads(self, batch: int, t: int) -> bool:
        """Whether a prompt of `batch` rows and t tokens goes through a padded, captured prefill."""
        return self.model.config.parscale_n * batch * self.prefill_len_for(t) < self.PREFILL_GRAPH_MAX_ROWS

    def prefill_len_for(self, t: int) -> int:
        """The padded length of a t-token prompt (see the module docstring)."""
        length = self.PREFILL_STEP
        while length < t:
            length *= 2
        return max(t, min(length, self.model.config.max_position_embeddings))

    @torch.no_grad()
    def _padded_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.cache.length = 0  # every prefill writes the same slots, after the prefix
        return self.model.last_logits(input_ids, attention_mask=attention_mask, cache=self.cache)

    def _padded_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.masked_prefill = True
        try:
            if not self.use_graph:
                return self.prefill_fn(input_ids, attention_mask)
            if self.prefill_graphs and self._prefill_captured_for != self._fingerprint():
                self._drop_prefill_graphs()  # parameters, buffers or the cache were replaced: capture again
            length = input_ids.shape[1]
            if length not in self.prefill_graphs:
                self._capture_prefill(input_ids, attention_mask)
            graph, ids, mask, logits = self.prefill_graphs[length]
            ids.copy_(input_ids)
            mask.copy_(attention_mask)
            graph.replay()
            cache.length = length  # the host counter a replay does not advance
            return logits.clone()  # the graph's own buffer is overwritten by the next prefill
        finally:
            cache.masked_prefill = False

    def _drop_prefill_graphs(self) -> None:
        """Forget the captured prefills and their memory pool. The pool's handle is not used again: a block
        allocated during a capture can outlive its graph (seen on an H100 with torch 2.11 after a process's first
        capture; a library workspace made on the capture stream is the likely owner), and capturing into a pool
        whose graphs are all gone while such a block lives fails inside torch's allocator (an internal assert)
        and leaves the CUDA generator in capture mode, so every later random draw in the process fails too."""
        self.prefill_graphs = {}
        self._prefill_pool = None

    def _capture_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        length = input_ids.shape[1]
        ids, mask = input_ids.clone(), attention_mask.clone()

        def run():
            return self.prefill_fn(ids, mask)

        side = warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation, cuBLAS handles, kernel choice
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self._prefill_pool is None:
            # One pool for every prompt length: prefills never overlap, and each one's logits are copied out
            # before the next replay.
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            logits = run()
        self.prefill_graphs[length] = (graph, ids, mask, logits)
        self._prefill_captured_for = self._fingerprint()
        self.prefill_captures += 1

    def read_len_for(self, written: int) -> int:
        """The cache slots a step reads once `written` tokens are in it (see the module docstring)."""
        if not self.bounded_reads:
            return self.max_len
        length = self.READ_STEP
        while length < written:
            length *= 2
        return min(length, self.max_len)

    @torch.no_grad()
    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row [B]; return the next logits [B, vocab]."""
        if self.written >= self.max_len:
            raise ValueError(f"engine cache is full ({self.max_len} tokens)")
        self.tokens.copy_(token.view(-1, 1))
        self.written += 1
        read_len = self.read_len_for(self.written)
        self.cache.read_len = read_len
        if not self.use_graph:
            return self.step_fn()
        if read_len not in self.graphs:
            self._capture(read_len)
        graph, logits = self.graphs[read_len]
        graph.replay()
        return logits

    def _capture(self, read_len: int) -> None:
        cache = self.cache
        # Warm-up and capture run the step for real; the key/value slot they write is written again by
        # the first replay, so restoring the position counters is enough.
        saved = (cache.pos.clone(), cache.key_valid.clone(), self.positions.clone())

        def restore():
            cache.pos.copy_(saved[0])
            cache.key_valid.copy_(saved[1])
            self.positions.copy_(saved[2])

        side = warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: compilation, cuBLAS handles, autotuning
                self.step_fn()
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # its own memory pool: a decode step's activations are small
            logits = self.step_fn()
        self.graphs[read_len] = (graph, logits)
        restore()
        self._captured_for = self._fingerprint()
        self.captures += 1


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, length: int):
    """Prompt and mask left-padded to `length` columns (padding: token 0, mask 0)."""
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ids = input_ids.new_zeros(b, length)
    mask = attention_mask.new_zeros(b, length)
    ids[:, length - t :] = input_ids
    mask[:, length - t :] = attention_mask
    return ids, mask


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream() -> torch.cuda.Stream:
    """The one side stream the warm-up before every graph capture runs on, per device. cuBLAS keeps a workspace
    for each stream it has run on until the process ends (tens of MiB each on Hopper): with a new stream per
    capture every captured graph leaked one, ~60 MiB per engine measured in a benchmark process
    (benchmarks/README.md)."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream()
    return _WARMUP_STREAMS[device]


def engine_for(model, compile: bool = False, padded_prefill: bool | None = None) -> DecodeEngine:
    """The model's engine, reused across calls and prompt lengths (one per model and settings, held weakly).
    compile=True: the decode step compiled by torch.compile before it is captured (the first call compiles).
    padded_prefill: see DecodeEngine (None: its default for the engine; True with compile=True compiles the
    padded prompt's forward too, once per padded length)."""
    engines = _ENGINES.setdefault(model, {})
    # keyed by the resolved setting, so that asking for the default explicitly reuses the same engine
    device = model.model.embed_tokens.weight.device
    key = (compile, DecodeEngine.resolved_padded_prefill(device, compile, padded_prefill))
    if key not in engines:
        engines[key] = DecodeEngine(model, compile=compile, padded_prefill=key[1])
    return engines[key]
