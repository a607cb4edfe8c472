"""The decode attention kernel (inference/decode_attention.py) equals the plain path's grouped decode attention:
its fallback everywhere, its kernel under Triton's CPU interpreter (where Triton is installed) and on a GPU
(`pytest -m gpu`), alone and inside a model's decode steps."""

import textwrap

import pytest
import torch
from conftest import HAS_TRITON, run_interpreted

from parscale.inference.decode_attention import decode_attention, kernel_available
from parscale.model.transformer import _grouped_decode_attention


def _inputs(n, heads, kv, s, d, dtype=torch.float32, device="cpu", hidden_lead=0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, 1, heads, d, generator=g, device=device, dtype=dtype).transpose(1, 2)  # as the model's
    k = torch.randn(n, kv, s, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(n, kv, s, d, generator=g, device=device, dtype=dtype)
    blocked = torch.rand(n, 1, 1, s, generator=g, device=device) < 0.3
    blocked[..., -1] = False  # the token of this step is always seen
    blocked[..., :hidden_lead] = True  # left padding: whole leading tiles hidden
    return q, k, v, blocked


def test_fallback_is_the_plain_path_on_cpu():
    q, k, v, blocked = _inputs(4, 6, 2, 37, 16)
    assert not kernel_available(q, k)
    assert torch.equal(decode_attention(q, k, v, blocked), _grouped_decode_attention(q, k, v, blocked))


INTERPRETED = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from test_decode_attention import _inputs
    from parscale.inference.decode_attention import launch
    from parscale.model.transformer import _grouped_decode_attention
    worst = 0.0
    for n, heads, kv, s, d, lead in ((1, 4, 4, 5, 8, 0), (3, 6, 2, 37, 24, 20), (2, 9, 3, 50, 16, 33),
                                     (8, 16, 2, 70, 96, 0)):
        q, k, v, blocked = _inputs(n, heads, kv, s, d, hidden_lead=lead, seed=s)
        want = _grouped_decode_attention(q.double(), k.double(), v.double(), blocked)
        # per: query heads per program; splits: shares of the slots (more shares than tiles included: 4 at 5
        # slots gives one share, 3 at 37 / 16-slot tiles gives 3 shares of 16, 16, 5; at lead 33 of 50 with 4
        # shares of 16 the first two see only hidden slots and must weigh nothing)
        # dot: the tiles' products as tl.dot (query group padded to 16 rows, head_dim 8 padded to 16); fp32 only
        # here: the interpreter's bf16 tl.dot is garbage (5e9 relative error on a lone 16 x 16 product, Triton
        # 3.9), so the dot form in bf16 / fp16 is checked by the GPU tests
        for block_s, per, splits, dot in ((16, None, 1, False), (32, None, 1, False), (16, 1, 1, False),
                                          (16, 2, 1, False), (16, None, 3, False), (16, 1, 4, False),
                                          (32, 2, 2, False), (16, None, 64, False), (16, None, 1, True),
                                          (32, 1, 3, True)):
            out = launch(q, k, v, blocked, block_s=block_s, heads_per_program=per, slot_splits=splits, use_dot=dot)
            assert out.shape == want.shape and out.dtype == torch.float32
            worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
        one_mask = blocked[:1]  # one mask row for every row
        out = launch(q, k, v, one_mask)
        want = _grouped_decode_attention(q.double(), k.double(), v.double(), one_mask)
        worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
    print(f"worst {worst:.2e}")
    assert worst < 1e-6, worst
""")

# A tiny model whose decode steps attend through the kernel under the interpreter: each decode step's logits
# (the same tokens fed) against the plain model's, float32, with a left-padded row.
INTERPRETED_MODEL = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from conftest import decode_step_logits, tiny_model
    from parscale.inference import decode_attention as da
    from parscale.inference.engine import engine_for
    da.kernel_available = lambda q, k: q.shape[2] == 1
    da._call_kernel = lambda q, k, v, blocked: da.launch(q, k, v, blocked)
    da.rope_kernel_available = lambda attn, q, cache: getattr(cache, "decoding", False) and q.shape[1] == 1
    rope_calls = []
    da._call_rope_kernel = lambda *a: rope_calls.append(1) or da.launch_rope(*a)

    def step_logits(model, ids, mask, fed):
        logits = decode_step_logits(model, ids, mask, fed)
        cache = engine_for(model).cache
        return logits, [c.clone() for c in (*cache.k, *cache.v)]

    for family, splits, dot in (("qwen2", 1, False), ("llama", 1, False), ("llama", 3, False), ("qwen2", 2, True)):
        da.HEADS_PER_PROGRAM = 1 if family == "llama" else 0  # one query head per program, or the whole group
        da.SLOT_SPLITS = splits  # 3: every step's slots in shares, combined by the second kernel
        da.USE_DOT = dot  # the tiles' products as tl.dot
        for fold_rope in (False, True):
            model = tiny_model(streams=3, family=family)
            ids = torch.randint(0, model.config.vocab_size, (2, 7))
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            fed = list(torch.randint(0, model.config.vocab_size, (10, 2)))
            plain, plain_cache = step_logits(model, ids, mask, fed)
            da.use_decode_attention(model, fold_rope=fold_rope)
            assert da.uses_decode_attention(model)
            kernel, cache = step_logits(model, ids, mask, fed)
            assert torch.equal(kernel[0], plain[0])  # the prefill is the plain path
            err = ((kernel - plain).norm() / plain.norm()).item()
            cache_err = max(((a - b).norm() / b.norm()).item() for a, b in zip(cache, plain_cache))
            print(family, splits, dot, fold_rope, f"decode logits rel err {err:.2e}, cache {cache_err:.2e}")
            assert 0 < err < 1e-5, err  # 0 would mean the kernel did not run
            assert cache_err < 1e-6, cache_err  # fold_rope writes the keys and values the plain path writes
            assert len(rope_calls) == (model.config.num_hidden_layers * len(fed) if fold_rope else 0)
            rope_calls.clear()
""")


# Every layer as parscale's kernels (the folded matmuls and the rope attention), dispatched through the registered
# torch operators as on a GPU (their schemas, the cache mutation), under the interpreter: decode-step logits.
INTERPRETED_STACK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, "tests")
    from conftest import decode_step_logits, randomize_norms, tiny_model
    from parscale.inference import decode_attention as da, skinny_matmul as sm
    from parscale.inference.fuse import fuse_projections
    da.rope_kernel_available = lambda attn, q, cache: getattr(cache, "decoding", False) and q.shape[1] == 1
    sm.kernel_available = lambda x, w: x.numel() // x.shape[-1] <= sm.MAX_ROWS

    model = randomize_norms(fuse_projections(tiny_model(streams=3)))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    fed = list(torch.randint(0, model.config.vocab_size, (6, 2)))
    plain = decode_step_logits(model, ids, mask, fed)
    da.use_decode_attention(model, fold_rope=True)
    sm.use_skinny_matmul(model, fuse_layers=True)
    for splits, dot in ((1, False), (2, False), (2, True)):  # 2: the operator runs its two kernels (shares, then
        da.SLOT_SPLITS, da.USE_DOT = splits, dot           # their combination); dot: the tiles' products as tl.dot
        err = ((decode_step_logits(model, ids, mask, fed) - plain).norm() / plain.norm()).item()
        print(f"slot splits {splits}, dot {dot}: decode logits rel err {err:.2e}")
        assert 0 < err < 1e-5, err
""")


@pytest.mark.parametrize("script", [INTERPRETED, INTERPRETED_MODEL, INTERPRETED_STACK],
                         ids=["kernel", "model", "every-layer-through-the-operators"])
def test_kernel_equals_the_plain_path_under_the_interpreter(script):
    run_interpreted(script)


def test_use_decode_attention_is_a_class_swap_that_keeps_the_state_dict():
    from conftest import same_state, state_snapshot, tiny_model

    from parscale.inference.decode_attention import KernelAttention, use_decode_attention, uses_decode_attention
    from parscale.model.transformer import Attention

    model = tiny_model(streams=2)
    before = state_snapshot(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    plain = model(ids)
    use_decode_attention(model)
    assert uses_decode_attention(model) and isinstance(model.model.layers[0].self_attn, KernelAttention)
    assert torch.equal(model(ids), plain)  # a prefill: the plain path
    assert same_state(model, before)
    use_decode_attention(model, enable=False)
    assert type(model.model.layers[0].self_attn) is Attention


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_on_gpu(dtype, splits, dot, monkeypatch):
    """No further from the exact result than the plain path in the same dtype, unsplit and in shares of the
    slots (a share of only hidden slots included: 300 hidden of 1,100 in 4 shares)."""
    from parscale.inference import decode_attention as da

    monkeypatch.setattr(da, "SLOT_SPLITS", splits)
    monkeypatch.setattr(da, "USE_DOT", dot)
    for n, heads, kv, s, d, lead in ((8, 16, 2, 176, 96, 0), (16, 16, 2, 1100, 96, 300), (4, 9, 3, 60, 64, 10)):
        q, k, v, blocked = _inputs(n, heads, kv, s, d, dtype=dtype, device="cuda", hidden_lead=lead)
        exact = _grouped_decode_attention(q.double(), k.double(), v.double(), blocked)
        plain_err = ((_grouped_decode_attention(q, k, v, blocked).double() - exact).norm() / exact.norm()).item()
        err = ((decode_attention(q, k, v, blocked).double() - exact).norm() / exact.norm()).item()
        assert err <= max(2 * plain_err, 1e-6 if dtype == torch.float32 else 4e-3), (n, s, err, plain_err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("fold_rope", [False, True])
@pytest.mark.parametrize("splits,dot", [(1, False), (3, False), (3, True)])
def test_engine_with_the_kernel_matches_the_plain_path(compile, fold_rope, splits, dot, monkeypatch):
    """fp32: each decode step's logits within summation-order error of the plain path's and the same greedy
    tokens, before and after the prefixes change in place; unsplit and in shares of the slots (two kernels)."""
    from conftest import decode_step_logits, tiny_model

    import parscale
    from parscale.inference import decode_attention as da
    from parscale.inference.decode_attention import use_decode_attention

    monkeypatch.setattr(da, "SLOT_SPLITS", splits)
    monkeypatch.setattr(da, "USE_DOT", dot)

    torch.manual_seed(0)
    model = tiny_model(streams=4).cuda()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    fed = list(torch.randint(0, model.config.vocab_size, (12, 2), device="cuda"))
    for _ in range(2):
        plain = parscale.generate(model, ids, attention_mask=mask, max_new_tokens=16, use_engine=False)
        plain_logits = decode_step_logits(model, ids, mask, fed, compile=compile)
        use_decode_attention(model, fold_rope=fold_rope)
        logits = decode_step_logits(model, ids, mask, fed, compile=compile)
        err = ((logits - plain_logits).norm() / plain_logits.norm()).item()
        assert 0 < err < 1e-5, err  # 0: the kernel did not run
        assert torch.equal(parscale.generate(model, ids, attention_mask=mask, max_new_tokens=16, use_engine=True,
                                             compile=compile), plain)
        use_decode_attention(model, enable=False)
        with torch.no_grad():
            model.model.layers[0].self_attn.prefix_k.mul_(1.5)


def test_kernels_run_only_on_capable_gpus(monkeypatch):
    """A GPU before compute capability 8.0 (or no Triton, or the CPU) takes the plain path."""
    from parscale.inference import triton_support

    monkeypatch.setattr(triton_support, "triton", object())
    monkeypatch.setattr(triton_support, "_CAPABILITY", {0: (7, 5), 1: (9, 0)})
    assert not triton_support.kernels_can_run(torch.device("cuda", 0))
    assert triton_support.kernels_can_run(torch.device("cuda", 1))
    assert not triton_support.kernels_can_run(torch.device("cpu"))
    monkeypatch.setattr(triton_support, "triton", None)
    assert not triton_support.kernels_can_run(torch.device("cuda", 1))


def test_pdl_only_where_asked_for_eager_and_on_hopper(monkeypatch):
    from parscale.inference import triton_support

    monkeypatch.setattr(triton_support, "HAS_GDC", True)
    monkeypatch.setattr(triton_support, "_CAPABILITY", {0: (8, 0), 1: (9, 0)})
    monkeypatch.setattr(triton_support, "_PDL", {"enabled": False})
    assert not triton_support.pdl_for(torch.device("cuda", 1))  # not asked for
    triton_support.set_pdl(True)
    assert triton_support.pdl_for(torch.device("cuda", 1))
    assert not triton_support.pdl_for(torch.device("cuda", 0))  # Ampere has no PDL
    assert not triton_support.pdl_for(torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not triton_support.pdl_for(torch.device("cuda", 1))  # a compiled step launches without it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper GPU (programmatic dependent launch)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_layer_as_parscale_kernels_with_pdl_matches_the_plain_path(dtype):
    """The graph engine with the folded layers, the rope attention and PDL between them: each decode step's
    logits as close to the plain path's as the same kernels without PDL (a read before its wait would not be)."""
    from conftest import decode_step_logits, tiny_model

    from parscale.inference import triton_support
    from parscale.inference.decode_attention import use_decode_attention
    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import use_skinny_matmul

    torch.manual_seed(0)
    model = fuse_projections(tiny_model(streams=4)).to(device="cuda", dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    fed = list(torch.randint(0, model.config.vocab_size, (24, 2), device="cuda"))

    def step_logits():
        return decode_step_logits(model, ids, mask, fed).float()

    plain = step_logits()
    use_skinny_matmul(model, fuse_layers=True)
    use_decode_attention(model, fold_rope=True)
    errors = {}
    try:
        for pdl in (False, True):
            triton_support.set_pdl(pdl)
            errors[pdl] = ((step_logits() - plain).norm() / plain.norm()).item()
    finally:
        triton_support.set_pdl(False)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    assert 0 < errors[False] < bound and 0 < errors[True] < bound, errors
    assert errors[True] <= 2 * errors[False] + 1e-7, errors


def test_a_class_swap_or_pdl_change_invalidates_captured_graphs():
    """A graph captured before use_decode_attention / use_skinny_matmul (or before PDL is switched) would replay
    the old kernels: the engine's fingerprint, checked before replaying, must see the change."""
    from conftest import tiny_model

    from parscale.inference import triton_support
    from parscale.inference.decode_attention import use_decode_attention
    from parscale.inference.engine import engine_for
    from parscale.inference.fuse import fuse_projections
    from parscale.inference.skinny_matmul import use_skinny_matmul

    model = fuse_projections(tiny_model(streams=2))
    engine = engine_for(model)
    engine.prefill(torch.randint(0, model.config.vocab_size, (1, 5)), None, 4)
    before = engine._fingerprint()
    use_decode_attention(model)
    after_attention = engine._fingerprint()
    use_skinny_matmul(model, fuse_layers=True)
    after_layers = engine._fingerprint()
    try:
        triton_support.set_pdl(True)
        after_pdl = engine._fingerprint()
    finally:
        triton_support.set_pdl(False)
    assert len({before, after_attention, after_layers, after_pdl}) == 4


@pytest.mark.skipif(not HAS_TRITON, reason="the launchers need Triton")
def test_launchers_name_what_is_wrong_before_launching():
    from parscale.inference import skinny_matmul as sm
    from parscale.inference.decode_attention import launch, launch_rope

    q, k, v, blocked = _inputs(2, 4, 2, 10, 8)
    with pytest.raises(ValueError, match="blocked must be"):
        launch(q, k, v, blocked[..., :5])
    with pytest.raises(ValueError, match="kv dividing heads"):
        launch(q[:, :3], k, v, blocked)
    cache = torch.zeros(2, 2, 12, 8)
    qp, kp = torch.zeros(2, 1, 32), torch.zeros(2, 1, 16)
    cos = torch.zeros(2, 1, 1, 8)
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"q, k, v must be \[n, 1, heads"):
        launch_rope(qp[:, :, :24], kp, kp, cos, cos, cache, cache, pos, 2, 10, blocked, 4)
    with pytest.raises(ValueError, match="do not agree"):
        launch_rope(qp, kp, kp, cos, cos, cache, cache, pos, 2, 13, torch.zeros(2, 1, 1, 13, dtype=torch.bool), 4)
    x, w = torch.zeros(17, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        sm.launch(x, w)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        sm.launch(x[:2], w, norm_weight=torch.ones(7))
    with pytest.raises(ValueError, match="an even count"):
        sm.launch(x[:2], torch.zeros(5, 8), swiglu=True)
    with pytest.raises(ValueError, match="residual has"):
        sm.launch(x[:2], w, swiglu=True, residual=torch.zeros(2, 6))
