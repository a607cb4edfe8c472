"""scripts/attention_cost.py: every prefix-attention route it times gives the masked reference's output."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "attention_cost.py"


def _script():
    spec = importlib.util.spec_from_file_location("attention_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_routes_it_times_are_exact_and_written(tmp_path, capsys):
    out = tmp_path / "cost.json"
    _script().main(["--model", "tiny", "--streams", "1,2,4", "--batch-size", "2", "--seq-len", "24", "--repeats", "1",
                    "--out", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["P"] for r in runs] == [2, 4]   # P = 1 has no prefix
    for r in runs:
        assert set(r["routes"]) == {"zero_queries", "lower_right"}   # flex has no backward pass on CPU
        for route in r["routes"].values():
            assert route["max_abs_error_vs_masked_reference"] < 1e-5 and route["ms"] > 0
        assert r["ratio"] == r["routes"]["zero_queries"]["ratio"]
    assert "flex skipped" in capsys.readouterr().out


def test_the_flex_route_masks_as_the_reference_does():
    """Forward only (FlexAttention's backward needs a GPU): every prefix slot, then causal keys, with GQA."""
    cost = _script()
    g = torch.Generator().manual_seed(0)
    rows, batch, heads, kv, t, n, d = 4, 2, 4, 2, 16, 5, 8
    q, k, v = (torch.randn(rows, h, t, d, generator=g) for h in (heads, kv, kv))
    prefix_k, prefix_v = torch.randn(rows // batch, kv, n, d, generator=g), torch.randn(rows // batch, kv, n, d,
                                                                                        generator=g)
    want = cost.masked_reference(q, k, v, prefix_k, prefix_v, batch)
    got = cost.flex_attention_route(q, k, v, prefix_k, prefix_v, batch)
    assert torch.allclose(got, want, atol=1e-5)
    # the mask matters: a route that let queries see later keys would differ
    k2, v2 = cost.with_prefix(k, v, prefix_k, prefix_v, batch)
    unmasked = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, enable_gqa=True)
    assert not torch.allclose(unmasked, want, atol=1e-3)
