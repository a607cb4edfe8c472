"""Which form of the int8 weight-only projection runs fastest in a compiled, graph-captured decode step.

A decode step multiplies a few rows (P · batch) by every weight matrix once, so it is bound by the bytes of the
weights: int8 should take about half the time of bf16. This times a chain of decoder-layer projections of the
paper-1.6b shape (q/k/v, o, gate/up, down; LAYERS layers of distinct weights, far larger than the L2 cache),
compiled with fullgraph and captured in a CUDA graph, as the compiled engine runs them, for each form:

  bf16          F.linear(x, w)                                       the baseline
  int8-linear   F.linear(x, q.to(bf16)) * s                          what gpt-fast writes
  int8-rows     (x[..., None, :] * q).sum(-1) * s  in fp32           one reduction that reads q once
  int8-rows-nm  the same with the output laid out [N, M]             rows of q shared by the M outputs

each with inductor's defaults and with coordinate-descent tuning, at M = 1 and 8 rows. Prints ms per step
and TB/s over the weight bytes; writes the table as JSON to --out.

    PYTHONPATH=src python scripts/int8_matvec.py --out int8_matvec.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from parscale.inference.engine import warmup_stream

LAYERS = 6
HIDDEN, INTER, KV = 1536, 8320, 192  # paper-1.6b: 16 heads of 96, 2 KV heads


def make_layers(int8: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
              "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
            if int8:
                s = w.abs().amax(1) / 127
                layer[name] = (torch.round(w / s[:, None]).to(torch.int8), s.to(torch.bfloat16))
            else:
                layer[name] = (w.to(torch.bfloat16), None)
        layers.append(layer)
    return layers


def project(form: str, x, weight):
    w, s = weight
    if form == "bf16":
        return F.linear(x, w)
    if form == "int8-linear":
        return F.linear(x, w.to(x.dtype)) * s
    if form == "int8-rows":
        return ((x.float().unsqueeze(-2) * w.float()).sum(-1) * s.float()).to(x.dtype)
    if form == "int8-rows-nm":
        out = (w.float().unsqueeze(1) * x.float().unsqueeze(0)).sum(-1) * s.float()[:, None]
        return out.t().to(x.dtype)
    raise ValueError(form)


def step(form, layers, x):
    for layer in layers:
        q, k, v = (project(form, x, layer[n]) for n in ("q", "k", "v"))
        attn = q + torch.cat([k, v] * 4, dim=-1)  # stands in for attention: depends on q, k and v
        x = x + project(form, attn, layer["o"])
        h = F.silu(project(form, x, layer["gate"])) * project(form, x, layer["up"])
        x = x + project(form, h, layer["down"])
    return x


def time_form(form: str, rows: int, tuning: bool, layers) -> dict:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda t: step(form, layers, t), fullgraph=True, dynamic=False)
    start = time.perf_counter()
    with inductor_config.patch(coordinate_descent_tuning=tuning):
        for _ in range(3):
            fn(x)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    ref = step("bf16" if form == "bf16" else "int8-linear", layers, x)  # eager, for the error
    graph = torch.cuda.CUDAGraph()
    stream = warmup_stream()  # the engine's: a new stream per form would hold a cuBLAS workspace each
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = fn(x)
    graph.replay()
    torch.cuda.synchronize()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    times = []
    for _ in range(7):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 50)
    ms = statistics.median(times)
    nbytes = sum(w.numel() * w.element_size() for layer in layers for w, _ in layer.values())
    return {"form": form, "rows": rows, "coordinate_descent_tuning": tuning, "ms_per_step": ms,
            "tb_s": nbytes / ms / 1e9, "weight_bytes": nbytes, "rel_err_vs_eager": err, "compile_s": compile_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="int8_matvec.json")
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--forms", default="bf16,int8-linear,int8-rows,int8-rows-nm")
    args = parser.parse_args()
    results = []
    weights = {True: make_layers(True), False: make_layers(False)}
    for rows in [int(r) for r in args.rows.split(",")]:
        for form in args.forms.split(","):
            for tuning in (False, True):
                r = time_form(form, rows, tuning, weights[form != "bf16"])
                results.append(r)
                print(f"rows {rows:2d} {form:13s} cd-tuning {int(tuning)}: {r['ms_per_step']:.4f} ms "
                      f"{r['tb_s']:.2f} TB/s  err {r['rel_err_vs_eager']:.1e}  compile {r['compile_s']:.0f} s",
                      flush=True)
                with open(args.out, "w") as f:
                    json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
                               "layers": LAYERS, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
