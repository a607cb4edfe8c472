"""pass@k for parscale_code_example: each program (prompt + completion, then the tests) runs in its own Python
subprocess, isolated (-I) in an empty temporary folder, and counts as passing if it exits 0 within TIMEOUT_S."""

import math
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 5.0


def build_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter: every sampled completion of a problem, appended to its prompt."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def passes(program: str, tests: str) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        # a file, not -c: a completion may hold bytes (NUL) that a command line cannot carry
        (Path(folder) / "program.py").write_text(program + "\n\n" + tests, encoding="utf-8", errors="replace")
        try:
            run = subprocess.run([sys.executable, "-I", "program.py"], cwd=folder, capture_output=True,
                                 timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False
    return run.returncode == 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples of which c pass (Chen et al.)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _score(references: list[str], predictions: list[list[str]], k: int) -> float:
    (tests,), (programs,) = references, predictions  # lm-eval calls a metric once per problem
    if len(programs) < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (repeats), got {len(programs)}")
    return pass_at_k(len(programs), sum(passes(p, tests) for p in programs), k)


def pass_at_1(references, predictions) -> float:
    return _score(references, predictions, 1)


def pass_at_4(references, predictions) -> float:
    return _score(references, predictions, 4)
