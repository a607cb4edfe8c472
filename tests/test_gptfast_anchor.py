"""The gpt-fast anchor of `parscale bench --gptfast-model`: it loads the user's model file, builds the preset's
shape through gpt-fast's ModelArgs, and decodes with advancing positions as gpt-fast's generate does.

The model file here is a small stand-in written by the test with gpt-fast's interface (ModelArgs, Transformer,
setup_caches, forward(idx, input_pos)); it records what the anchor asked of it."""

from __future__ import annotations

import json

import pytest
import torch

from parscale.analysis.anchors import gptfast_anchor, load_gptfast_module
from parscale.model.config import ModelConfig

STAND_IN = r'''
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from torch import nn

LOG = Path(__file__).with_suffix(".calls.jsonl")

def record(*call):
    with LOG.open("a") as f:
        f.write(json.dumps(call) + "\n")

@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = None
    n_local_heads: int = -1
    rope_base: float = 10000
    norm_eps: float = 1e-5

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        record("init", asdict(config))
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def setup_caches(self, max_batch_size, max_seq_length):
        record("setup_caches", max_batch_size, max_seq_length)

    def forward(self, idx, input_pos):
        record("forward", list(idx.shape), input_pos.tolist())
        return self.output(self.tok_embeddings(idx))
'''


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(STAND_IN)
    return path


def test_gptfast_anchor_builds_the_shape_and_decodes_at_advancing_positions(model_file):
    row = gptfast_anchor("tiny", model_file, batch=1, length=40, chunk=8, device="cpu", dtype=torch.float32,
                         compile=False)
    calls = [json.loads(line) for line in model_file.with_suffix(".calls.jsonl").read_text().splitlines()]
    cfg = ModelConfig.preset("tiny", parscale_n=1)
    args = calls[0][1]
    assert calls[0][0] == "init" and (args["n_layer"], args["dim"], args["n_head"], args["n_local_heads"],
                                      args["intermediate_size"], args["vocab_size"], args["block_size"]) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.intermediate_size, cfg.vocab_size, 80)
    assert calls[1] == ["setup_caches", 1, 80]
    forwards = [c for c in calls if c[0] == "forward"]
    # two passes (warm-up and timed), each: one prefill of 40 positions, then 4 chunks of 8 single-token steps
    per_pass = 1 + (40 - 1) // 8 * 8
    assert len(forwards) == 2 * per_pass
    first_pass = forwards[:per_pass]
    assert first_pass[0] == ["forward", [1, 40], list(range(40))]
    assert [c[2] for c in first_pass[1:]] == [[40 + i] for i in range(32)]
    assert all(c[1] == [1, 1] for c in first_pass[1:])
    assert row["anchor"] == "gpt-fast" and row["cache_len"] == 80 and row["decode_ms_per_token"] > 0
    assert row["decode_ms_min"] <= row["decode_ms_per_token"] <= row["decode_ms_max"]


def test_gptfast_anchor_names_a_wrong_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpt-fast model file .* does not exist"):
        load_gptfast_module(tmp_path / "missing.py")
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no Transformer or ModelArgs"):
        load_gptfast_module(other)


def test_gptfast_anchor_refuses_a_prompt_too_short_to_time(model_file):
    with pytest.raises(ValueError, match="too short"):
        gptfast_anchor("tiny", model_file, length=16, chunk=8, device="cpu", compile=False)


def test_gptfast_module_is_importable_by_name(model_file):
    """torch.compile re-imports the module of the code it traces by its name, so the loaded file must be
    registered under that name (without it, the compiled anchor failed with ModuleNotFoundError on CUDA)."""
    import sys

    module = load_gptfast_module(model_file)
    assert sys.modules[module.__name__] is module
