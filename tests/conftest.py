"""Shared helpers for the CPU test suite."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name.startswith("official_"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_model(streams=1, family="qwen2", seed=0, **overrides):
    import parscale

    preset = {"qwen2": "tiny", "llama": "tiny-llama", "qwen3": "tiny-qwen3"}[family]
    cfg = parscale.ModelConfig.preset(preset, parscale_n=streams, **overrides)
    model = parscale.build_model(cfg, seed=seed).eval()
    # Make the output far from degenerate: a fresh model's zero aggregator gives uniform weights.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "aggregate_layer" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


HAS_TRITON = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode == 0

# A kernel whose loop runs to a bound given at launch: Triton 3.6's interpreter fails on it with numpy 2
# ("only 0-dimensional arrays can be converted to Python scalars"), Triton 3.9's runs it.
_INTERPRETER_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def probe(x_ptr, n, BLOCK: tl.constexpr):
    for s in range(0, n, BLOCK):
        tl.store(x_ptr + s + tl.arange(0, BLOCK), tl.full((BLOCK,), 1.0, tl.float32))
x = torch.zeros(8)
probe[(1,)](x, 8, BLOCK=4)
assert x.sum().item() == 8
"""


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here (None: it can)."""
    if not HAS_TRITON:
        return "Triton is not installed (the interpreter runs the kernels on CPU)"
    done = interpreted(_INTERPRETER_PROBE, timeout=120)
    if done.returncode == 0:
        return None
    import numpy
    import triton

    return (f"Triton {triton.__version__}'s CPU interpreter fails on a loop with a launch-time bound with numpy "
            f"{numpy.__version__}: {done.stderr.strip().splitlines()[-1][:200]}")


def interpreted(script: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a Python script with Triton's CPU interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


def run_interpreted(script: str, timeout: int = 900) -> None:
    """The script under the interpreter must exit cleanly; skipped where the interpreter cannot run here."""
    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
    done = interpreted(script, timeout)
    assert done.returncode == 0, done.stderr[-3000:]


def randomize_norms(model, seed: int = 0):
    """RMSNorm weights away from 1, so that a kernel that folds a norm in and drops its weight is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


def decode_step_logits(model, ids, mask, fed, compile: bool = False) -> torch.Tensor:
    """The engine's logits for the prompt and then for each token of `fed` [steps, B], stacked [steps + 1, B, V].
    Each is cloned: a captured graph returns the same buffer at every replay."""
    from parscale.inference.engine import engine_for

    engine = engine_for(model, compile=compile)
    out = [engine.prefill(ids, mask, len(fed) + 1).clone()]
    out += [engine.decode(token).clone() for token in fed]
    return torch.stack(out)


def state_snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snapshot: dict) -> bool:
    """Whether the model's state dict has exactly the snapshot's keys and tensors."""
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], v) for k, v in snapshot.items())


WORDS = ("def", "return", "if", "else", "for", "in", "range", "x", "y", "self", "print", "import", "os", "(", ")",
         ":", "=", "+", "1", "0", "None", "True", "class", "while", "lambda", "yield", "with", "as", "len", "data")


def synthetic_corpus(folder: Path, files: int = 12, lines: int = 60) -> None:
    """A fixed pseudo-code corpus (seeded), so the loss trace does not depend on the Python version."""
    import random

    rng = random.Random(0)
    for i in range(files):
        text = "\n".join("    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                         for _ in range(lines))
        (folder / f"f{i:02d}.py").write_text(text + "\n")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small fixed corpus and a 512-token BPE trained on it."""
    from parscale.training.data import build_shards, iter_texts
    from parscale.training.tokenizer import train_bpe

    src = tmp_path_factory.mktemp("src")
    synthetic_corpus(src)
    tok = train_bpe(iter_texts([src], glob="*.py"), vocab_size=512)
    out = tmp_path_factory.mktemp("data")
    build_shards([src], out, tok, glob="*.py", val_fraction=0.2, progress=False)
    return out
