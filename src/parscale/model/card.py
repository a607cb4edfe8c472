"""The model card (README.md with YAML metadata) that `save` writes beside the weights.

The metadata block uses the Hub's keys (`library_name: parscale`, `tags`, `base_model` when the model was
converted or trained from another) and a `parscale` block with P, prefix tokens, ε and the parameter
counts, and the training data and tokens when known. `save` replaces a card only while the folder's
ownership marker proves parscale wrote it unchanged (io/ownership.py): an edited card is the user's and kept.
"""

from __future__ import annotations

import json

from parscale.model.config import ModelConfig

MARKER = "<!-- model card written by parscale; saving again replaces it unless you edit it -->"


def _yaml(value) -> str:
    # JSON scalars are valid YAML; strings are quoted so that no value is misread.
    return json.dumps(value, ensure_ascii=False)


def model_card(config: ModelConfig, name: str, base_model: str | None = None, training: dict | None = None) -> str:
    counts = config.param_counts()
    lines = ["---", "library_name: parscale", "tags:", "  - parscale", "  - parallel-scaling", f"  - {config.family}"]
    if base_model:
        lines.append(f"base_model: {_yaml(str(base_model))}")
    lines += ["parscale:", f"  model_type: {_yaml(config.model_type)}", f"  streams: {config.parscale_n}",
              f"  prefix_tokens: {config.prefix_len}",
              f"  smoothing: {_yaml(config.parscale_attn_smooth if config.parscale_n > 1 else None)}",
              "  parameters:"] + [f"    {k}: {v}" for k, v in counts.items()]
    if training:
        lines.append("  training:")
        lines += [f"    {k}: {_yaml(v)}" for k, v in training.items() if v is not None]
    lines += ["---", MARKER, "", f"# {name}", ""]
    kind = (f"a ParScale model with P = {config.parscale_n} parallel streams, each with its own learned prefix of "
            f"{config.prefix_len} key/value pairs per layer, mixed by a learned aggregator (ε = "
            f"{config.parscale_attn_smooth})" if config.parscale_n > 1 else
            f"a P = 1 model with a learned prefix of {config.prefix_len} tokens (the prefix control)"
            if config.has_prefix else "a plain (P = 1) model")
    lines.append(f"This is {kind}: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
                 f"{counts['non_embedding']:,} non-embedding parameters ({counts['parscale']:,} of them added by "
                 f"ParScale), {counts['total']:,} in all.")
    if base_model:
        lines += ["", f"Made from `{base_model}`."]
    if training:
        lines += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in training.items() if v is not None) + "."]
    lines += ["", "Load it with the parscale library:", "", "```python", "import parscale",
              f"model = parscale.load({_yaml(name)})", "```", ""]
    return "\n".join(lines)
