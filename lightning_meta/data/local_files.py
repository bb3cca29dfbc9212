"""Local files only: data packages, the Hugging Face cache, the cache folder, GGUF checkpoints. Nothing is
downloaded."""

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


#: How the Hugging Face hub names a model: ``owner/name`` (``HuggingFaceTB/SmolLM2-135M``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def resolve_local_path(spec: str) -> Path:
    """A local path; ``pkg:NAME[/sub/dir]``: the folder of an installed data package, or a path
    inside it (the package is located without being imported); or a hub id (``owner/name``) that is
    not a local path: its snapshot in the local Hugging Face cache, found without the network.

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
    if path.exists():
        return path
    if is_hub_id(spec):
        cache = hub_cache_dir()
        snapshot = _cached_snapshot(spec, cache)
        if snapshot is None:
            raise FileNotFoundError(
                f"{spec!r} is neither a local path nor a model in the Hugging Face cache ({cache}). Nothing is "
                f"downloaded at run time: on a connected machine run `hf download {spec}` (older clients: "
                f"`huggingface-cli download {spec}`) and copy that machine's cache folder to {cache} (or point "
                "HF_HOME at a copy), or give the folder of a save_pretrained copy."
            )
        return snapshot
    raise FileNotFoundError(
        f"{spec!r} is not a local path. Nothing is downloaded at run time: save the model or tokenizer with "
        "save_pretrained and give its folder."
    )


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a hub id (``owner/name``) and is no local path (nor a missing ``.ckpt``)."""
    return _HUB_ID.fullmatch(spec) is not None and not spec.endswith(".ckpt") and not Path(spec).expanduser().exists()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment sets it now: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:  # local_files_only: reads the cache's refs and snapshots, never the network
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


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


def write_folder_atomically(folder: Path, write: Callable[[Path], None], replace: bool = False) -> None:
    """Fill ``folder`` by ``write(staging)`` in a new folder beside it, then rename that into place.

    Nobody ever sees a half-written ``folder``: not concurrent processes (DDP ranks, parallel
    tests), of which the first to finish wins, nor a run that stops midway. ``replace``: an
    existing ``folder`` is swapped for the new one only once the new one is complete (callers
    decide whether it may be replaced); otherwise an existing one is kept.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the folder from other users
        if replace and folder.exists():
            retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            folder.rename(retired / folder.name)
            staging.rename(folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(folder)
    except OSError:
        if replace or not folder.exists():
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
