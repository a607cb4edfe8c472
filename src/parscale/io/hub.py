"""Hugging Face Hub ids as model paths: `parscale.load("ParScale/ParScale-1.8B-P8")`, `--model ORG/NAME`.

A name that is not an existing local path and has the form `org/name` is a Hub id. Its files are taken
from the local Hub cache, or downloaded into it, by `huggingface_hub.snapshot_download`, which follows
the usual rules: `HF_HOME` / `HF_HUB_CACHE` choose the cache, `HF_HUB_OFFLINE=1` never touches the
network, `HF_TOKEN` authenticates; `revision` picks a branch, tag or commit. Only what parscale reads
is fetched: config, weights, tokenizer, chat template and generation files (`HUB_FILES`). Every failure
(not cached while offline, no such repository or revision, no network) is one CheckpointError.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "generation_config.json", "chat_template.jinja", "chat_template.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(name) -> bool:
    """`org/name` that is not a local path (a relative folder of that name wins, as in transformers)."""
    text = str(name)
    return bool(_HUB_ID.match(text)) and not Path(text).exists() and not text.startswith((".", "/"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder holding repo_id's files at revision (downloaded when not cached and online)."""
    from parscale.model.checkpoint import CheckpointError

    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local folder, and Hub ids need the huggingface_hub package "
                              f"(pip install huggingface_hub)") from None
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                   local_files_only=_offline())
    except GatedRepoError:
        raise CheckpointError(f"{where} is a gated repository: accept its terms on the Hub and log in "
                              f"(HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: no such revision of that Hub repository") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where} is neither a local folder nor a Hub repository that can be reached "
                              f"(private repositories need HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        mode = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise CheckpointError(f"{where} is not a local folder and not in the local Hub cache, and {mode}: "
                              f"download it once online (or point HF_HUB_CACHE at a cache that holds it)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: could not be fetched from the Hub ({type(e).__name__}: {e})") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{where} has no config.json: not a model repository parscale can read")
    return folder


def resolve(name_or_path, revision: str | None = None) -> Path:
    """A local folder for a path or a Hub id (see the module docstring)."""
    if looks_like_hub_id(name_or_path):
        return hub_snapshot(str(name_or_path), revision)
    if revision is not None:
        from parscale.model.checkpoint import CheckpointError

        raise CheckpointError(f"revision {revision!r} was given, but {str(name_or_path)!r} is not a Hub id "
                              f"(org/name)")
    return Path(name_or_path)
