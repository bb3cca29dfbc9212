"""Writing an export folder: a Hugging Face ``save_pretrained`` folder with the tokenizer and ``meta_learning.json``
(the provenance), written beside its destination and renamed into place, so that an existing export is never left
half-replaced; ``--overwrite`` replaces earlier exports only."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lightning_meta.data.local_files import write_folder_atomically
from lightning_meta.version import VERSION

#: The provenance file an export holds beside the weights.
PROVENANCE_FILE = "meta_learning.json"


ADAPTER_FILE = "adapter_config.json"  # what peft's save_pretrained writes: marks an earlier adapter export


def write_export(model: Any, provenance: dict[str, Any], output: Path, overwrite: bool = False) -> None:
    """Write ``model`` (``save_pretrained``), its tokenizer and provenance to ``output``, atomically."""
    provenance = dict(provenance)
    text_tokenizer = provenance.pop("tokenizer_object")
    provenance["lightning_meta_version"] = VERSION

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        text_tokenizer.save_pretrained(staging)
        if model.can_generate() and not (staging / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")

    write_atomically(output, write, overwrite)


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``meta_learning.json`` of an exported folder, or ``None`` for another Hugging Face folder."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def refuse_existing(output: Path, overwrite: bool, source: Path | None = None, marker: str = PROVENANCE_FILE) -> None:
    """Refuse an existing ``output`` unless ``overwrite`` and it is an earlier export (it holds ``marker``)
    that holds no ``source``.

    ``--overwrite`` replaces exports only: never a run folder, the checkpoint being exported (or a folder
    above it), a plain file, or anything else that happens to be there.
    """
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"{output} already exists. Give another --output_dir, or --overwrite=true to replace it (the old folder "
            "is kept until the new one is complete)."
        )
    resolved = output.resolve()
    if source is not None and (resolved == source.resolve() or resolved in source.resolve().parents):
        raise FileExistsError(
            f"{output} holds the checkpoint being exported ({source}): --overwrite would delete it. Give a new "
            "--output_dir outside the run folder, e.g. exports/NAME."
        )
    if not (output.is_dir() and (output / marker).is_file()) or output.is_symlink():
        raise FileExistsError(
            f"{output} exists and is not an earlier export (no {marker} in it): --overwrite only replaces a folder "
            "lightning-meta export wrote. Give a new --output_dir, or move that one away yourself."
        )


def check_writable(output: Path) -> None:
    """Fail before any model is loaded when ``output`` cannot be written beside (read-only disk, no permission)."""
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = Path(tempfile.mkdtemp(dir=parent, prefix=".lightning-meta-write-check-"))
    except OSError as error:
        raise PermissionError(
            f"Cannot write to {parent} ({error.strerror}): {output} cannot be created there. Give an --output_dir "
            "on a writable file system."
        ) from None
    probe.rmdir()


def write_atomically(output: Path, write: Any, overwrite: bool, marker: str = PROVENANCE_FILE) -> None:
    """``write(staging)`` into a new folder beside ``output``, then rename it into place (an earlier export
    at ``output`` is replaced only when ``overwrite`` allows it, see :func:`refuse_existing`)."""
    refuse_existing(output, overwrite, marker=marker)
    write_folder_atomically(
        output, write, replace=True, what="the export", remedy=", or give an --output_dir on another disk"
    )
