"""Which allocations are alive at a benchmark point's memory peak: runs `measure_point` for a sequence of
(batch, length) points on one random model, records the CUDA allocator's history for the last one, and
prints the largest blocks alive at its peak with the Python lines that allocated them.

    PYTHONPATH=src python scripts/memory_peak_trace.py --shape paper-1.6b --streams 8 --points 2x512,4x64
"""

import argparse
import gc
import json

import torch

from parscale.analysis.bench import measure_point, random_model


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replay the allocator's alloc/free events; the blocks alive when the allocated total was highest."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] in ("free_requested",) and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    return peak, sorted(at_peak.values(), key=lambda e: -e["size"])


def where(event: dict) -> str:
    frames = [f for f in event.get("frames", []) if f["filename"].endswith(".py") and "torch/" not in f["filename"]]
    return " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames[:4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="paper-1.6b")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--points", default="2x512,4x64", help="batch x length, comma-separated; the last is traced")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = random_model(args.shape, args.streams)
    points = [tuple(int(v) for v in p.split("x")) for p in args.points.split(",")]
    report = {"shape": args.shape, "P": args.streams, "points": []}
    for i, (batch, length) in enumerate(points):
        last = i == len(points) - 1
        if last:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        before = torch.cuda.memory_allocated()
        point = measure_point(model, batch, length, "graph", memory_only=True)
        row = {"batch": batch, "length": length, "peak_gib": point["peak_memory_gib"], "allocated_before_gib":
               before / 2**30}
        if last:
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak, blocks = live_at_peak(snapshot["device_traces"][0])
            row["traced_peak_gib"] = peak / 2**30
            row["largest_at_peak"] = [{"mib": e["size"] / 2**20, "where": where(e)} for e in blocks[: args.top]]
        report["points"].append(row)
        print(json.dumps(row, indent=1), flush=True)
        gc.collect()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
