"""Measuring models: evaluation (held-out loss, lm-evaluation-harness), stream diagnostics, benchmarks,
the cost model, and the parallel scaling law."""
