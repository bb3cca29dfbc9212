"""Local files only: data packages, the cache folder, GGUF checkpoints. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cache_dir() -> Path:
    """``$LIGHTNING_META_CACHE`` or ``~/.cache/lightning_meta``."""
    return Path(os.environ.get("LIGHTNING_META_CACHE", Path.home() / ".cache" / "lightning_meta"))


def resolve_local_path(spec: str) -> Path:
    """A local path, or ``pkg:NAME[/sub/dir]``: the folder of an installed data package, or a path
    inside it. The package is located without being imported.

    The one resolver of model, tokenizer and data paths: every learner and datamodule uses it.
    """
    if spec.startswith("pkg:"):
        name, _, inside = spec.removeprefix("pkg:").partition("/")
        found = importlib.util.find_spec(name) if name.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: package {name!r} is not installed (pip install --no-deps {name}).")
        path = Path(list(found.submodule_search_locations)[0]) / inside
        if not path.exists():
            raise FileNotFoundError(f"{spec}: the package {name!r} has no {inside!r} (looked in {path}).")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r} is not a local path. Nothing is downloaded at run time: save the model or tokenizer with "
            "save_pretrained and give its folder."
        )
    return path


def dequantized_gguf(folder: Path, gguf_file: str) -> Path:
    """Dequantize a GGUF checkpoint once into a cached ``save_pretrained`` folder, tokenizer included.

    Loading the GGUF takes ~17 s for a 135M model; the cached folder then loads in ~0.2 s.
    ``save_pretrained`` refuses GGUF-loaded models, so the weights are copied into a fresh model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = folder / gguf_file
    key = hashlib.sha1(f"{source.resolve()}-{source.stat().st_size}".encode()).hexdigest()[:12]
    cached = cache_dir() / "models" / f"{source.stem}-{key}"
    if not (cached / "config.json").exists():

        def write(staging: Path) -> None:
            loaded = load_pretrained(AutoModelForCausalLM, folder, gguf_file=gguf_file, dtype=torch.float32)
            config = loaded.config
            config.quantization_config = None
            fresh = type(loaded)(config)
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(staging)
            load_pretrained(AutoTokenizer, folder, gguf_file=gguf_file).save_pretrained(staging)

        write_folder_atomically(cached, write)
    return cached


def write_folder_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill ``folder`` by ``write(staging)`` then rename, so concurrent processes (DDP ranks,
    parallel tests) never read a half-written folder; the first finisher wins."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
    try:
        write(staging)
        staging.rename(folder)
    except OSError:
        if not folder.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_pretrained(loader: Any, folder: Path, trust_remote_code: bool = False, **options: Any) -> Any:
    """``loader.from_pretrained(folder, ...)`` (an ``Auto*`` class) with the folder's own Python code off
    unless ``trust_remote_code``, and one-line errors for a folder transformers cannot read.

    Passing ``trust_remote_code=False`` explicitly matters: left unset, transformers asks on stdin
    whether to run a folder's ``auto_map`` code, and a ``y`` there (or piped in) runs it.
    """
    try:
        return loader.from_pretrained(folder, trust_remote_code=trust_remote_code, **options)
    except (ValueError, OSError) as error:
        text = str(error)
        if "trust_remote_code" in text:
            problem = (
                "holds its own model code (auto_map in config.json), which is never run unless asked. If you trust "
                "that code, set trust_remote_code: true for this model (--model.trust_remote_code=true)"
            )
        elif "not a valid JSON file" in text:
            problem = "has a config.json that is not valid JSON (damaged or cut short). Re-export or re-save the model"
        elif "does not recognize this architecture" in text:
            model_type = re.search(r"model type `([^`]*)`", text)
            problem = (
                f"has a config.json with model_type {model_type.group(1) if model_type else '?'!r}, which is not a "
                "model type transformers has. Give a folder written by save_pretrained of a supported model "
                "(lightning-meta export writes one), or fix model_type in its config.json"
            )
        else:
            raise
        raise ValueError(f"The model folder {folder} {problem}.") from None
