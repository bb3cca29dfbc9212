"""Local files only: data packages, the Hugging Face cache, the cache folder, GGUF checkpoints. Nothing is
downloaded."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_VARIABLE = "LIGHTNING_META_CACHE"
#: Bytes of a name kept in a cache entry's name: the rest of the name is in the entry's key (a hash),
#: and the file system's limit (255 bytes) must leave room for the key and a ``.partial`` staging name.
_NAME_BYTES = 100


def cache_dir() -> Path:
    """``$LIGHTNING_META_CACHE`` or ``~/.cache/lightning_meta``; refused in one line when it is (or lies
    under) something other than a folder."""
    folder = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "lightning_meta").expanduser()
    existing = next(path for path in (folder, *folder.parents) if path.exists() or path == path.parent)
    if not existing.is_dir():
        where = f"{CACHE_VARIABLE}={folder}" if os.environ.get(CACHE_VARIABLE) else f"The cache folder {folder}"
        raise ValueError(
            f"{where} cannot be the cache folder: {existing} is a file, not a folder. Point {CACHE_VARIABLE} at a "
            "folder (it is created when missing), or move that file away."
        )
    return folder


#: The end of the full-disk message for a cache entry (:func:`disk_full_error`).
CACHE_FULL_REMEDY = f", or point {CACHE_VARIABLE} at a folder on another disk"


def cache_entry(kind: str, name: str, key: str) -> Path:
    """``cache_dir()/kind/NAME-key``: ``name`` (a file or folder name, for people) cut to a length every file
    system takes; ``key`` (a hash) must tell entries apart by itself."""
    short = name.encode()[:_NAME_BYTES].decode(errors="ignore")
    return cache_dir() / kind / f"{short}-{key}"


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
                f"{spec!r} is neither a local path (nothing at {path.absolute()}) nor a model in the Hugging Face "
                f"cache ({cache}). If it is a folder that moved, or a path relative to the folder of an earlier "
                "command, give the folder where it is now. Nothing is downloaded at run time: for a hub model, on a "
                f"connected machine run `hf download {spec}` (older clients: `huggingface-cli download {spec}`) and "
                f"copy that machine's cache folder to {cache} (or point HF_HOME at a copy), or give the folder of a "
                "save_pretrained copy."
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = folder / gguf_file
    # Modification time too, as the collection cache: a replacement of the same size is another model.
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}-{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = cache_entry("models", source.stem, key)
    if not (cached / "config.json").exists():

        def write(staging: Path) -> None:
            loaded = load_pretrained(AutoModelForCausalLM, folder, gguf_file=gguf_file, dtype=torch.float32)
            config = loaded.config
            config.quantization_config = None
            fresh = type(loaded)(config)
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(staging)
            load_pretrained(AutoTokenizer, folder, gguf_file=gguf_file).save_pretrained(staging)

        write_folder_atomically(cached, write, what="the dequantized model", remedy=CACHE_FULL_REMEDY)
    return cached


def write_folder_atomically(
    folder: Path, write: Callable[[Path], None], replace: bool = False, what: str = "the folder", remedy: str = ""
) -> None:
    """Fill ``folder`` by ``write(staging)`` in a new folder beside it, then rename that into place.

    Nobody ever sees a half-written ``folder``: not concurrent processes (DDP ranks, parallel
    tests), of which the first to finish wins, nor a run that stops midway. ``replace``: an
    existing ``folder`` is swapped for the new one only once the new one is complete (callers
    decide whether it may be replaced); otherwise an existing one is kept. A full disk is said in
    one line (:func:`disk_full_error`, with ``what`` and ``remedy``); staging folders that a killed
    process left beside ``folder`` are removed first.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(folder.parent)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_partial_prefix(folder)}-"))
    try:
        write(staging)
        modes_as_umask_gives(staging)  # mkdtemp's 0o700 (and safetensors' 0o600 files) would hide them from others
        if replace and folder.exists():
            retired = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-{_owner_tag()}-"))
            folder.rename(retired / folder.name)
            staging.rename(folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(folder)
    except Exception as error:
        if isinstance(error, OSError) and not replace and folder.exists():
            return  # another process wrote it meanwhile: theirs is as good
        if is_disk_full(error):
            raise disk_full_error(folder, what, replace, remedy) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file_atomically(path: Path, write: Callable[[Path], None], what: str = "the file", remedy: str = "") -> None:
    """Write ``path`` by ``write(partial)`` into a hidden file beside it, then rename that into place.

    A full disk or a stopped process never leaves a truncated file under ``path`` (an earlier one is
    kept), nor, but after SIGKILL, a partial file; a killed process's partial files are removed by the
    next write into that folder (:func:`remove_stale_partials`). A full disk is said in one line, naming
    ``what`` was not saved and ending with ``remedy``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path.parent)
    partial = path.with_name(_partial_prefix(path))
    try:
        write(partial)
        modes_as_umask_gives(partial)
        os.replace(partial, path)
    except BaseException as error:  # Ctrl-C and SIGTERM too: no partial file is left
        partial.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(path, what, True, remedy) from None
        raise


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it: set back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def modes_as_umask_gives(path: Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open``/``mkdir`` would under the
    user's umask: writers that go through temporary files (``mkdtemp``, safetensors' ``save_file``) leave 0o700
    folders and 0o600 files, which other users of a shared folder cannot read. Links are left alone."""
    umask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for each in paths:
        if each.is_symlink():
            continue
        each.chmod((0o777 if each.is_dir() else 0o666) & ~umask)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) says the disk is full: ``ENOSPC``, or the same said by a writer
    that raises its own error type (torch's zip writer, safetensors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(current) for text in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(path: Path, what: str, kept: bool, remedy: str = "") -> OSError:
    """The one-line error for a full disk while writing ``path`` (``kept``: an earlier ``path`` is untouched)."""
    earlier = "; an earlier one of that name is kept" if kept else ""
    return OSError(
        errno.ENOSPC,
        f"The disk is full: {what} {path} was not saved (no partial file is left{earlier}). Free space on the disk "
        f"of {path.parent}{remedy}",
    )


#: A staging name: ``.NAME.partial-PID-HOST`` (files) or ``.NAME.partial-PID-HOST-RANDOM`` (folders), and
#: ``.NAME.old-PID-HOST-RANDOM`` for a folder being replaced. PID and HOST say whose it is.
_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?:-[^/]*)?")


def _owner_tag() -> str:
    """``PID-HOST`` (HOST: 8 hex digits of the host name's hash): whose staging files these are."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}-{host}"


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-{_owner_tag()}"


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the staging files and folders in ``folder`` that a process of this host left when it was killed
    (SIGKILL, a crash, a power cut) while writing; those of live processes and of other hosts stay, and so does
    a folder being replaced (``.old-``) while nothing has taken its name: it is then the only copy. Returns the
    paths removed."""
    host = _owner_tag().split("-")[1]
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _PARTIAL.fullmatch(name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not (folder / match["name"]).exists():
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
                "that code, set trust_remote_code: true for this model (fit: "
                "--model.learner.init_args.trust_remote_code=true; pretrain: --model.trust_remote_code=true)"
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
