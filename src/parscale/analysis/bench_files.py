"""Reading the JSON files `parscale bench` writes, with one clear error for a file that is not one.

The report (`bench-report`) and the cost model's calibration and validation (`cost --validate-*`) read
these files; a wrong file (another JSON, a CSV, a memory-only grid given as timings) is named with what it
lacks, instead of surfacing as a KeyError or a JSON parser's message without the file's name.
"""

from __future__ import annotations

import json
from pathlib import Path

POINT_KEYS = ("shape", "P", "batch", "length")
LATENCY_KEYS = ("decode_ms_per_token", "latency_s")
MEMORY_KEYS = ("peak_memory_gib",)


def read_bench_json(path, needs: tuple[str, ...] = ()) -> dict:
    """The whole file, checked: a JSON object with a 'points' list whose every point has the shape, P,
    batch and length keys and the measurement keys in `needs` (LATENCY_KEYS, MEMORY_KEYS)."""
    path = Path(path)
    what = "a benchmark JSON file written by `parscale bench`"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"no such benchmark file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not {what} ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ValueError(f"{path} is not {what} (no 'points' list)")
    for i, point in enumerate(data["points"]):
        missing = [k for k in (*POINT_KEYS, *needs) if not isinstance(point, dict) or k not in point]
        if missing:
            raise ValueError(f"{path}: point {i} has no {', '.join(missing)}"
                             + (" (a memory-only grid has no timings)" if set(missing) & set(LATENCY_KEYS) else ""))
    return data
