"""What a checkpoint holds and how it is read safely.

Checkpoints are read from local files only and always with ``weights_only=True``: a pickle can
run code, and Lightning unpickles a URL checkpoint with ``weights_only=False``. A checkpoint leaves out the
frozen pretrained weights its learner rebuilds (a slim checkpoint) and records the tokenizer
(:func:`write_module_state`, :func:`read_module_state`, the host module's checkpoint hooks). Writing them
during a run (atomically; on preemption) is :mod:`lightning_meta.training.preemption`.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_meta.data.local_files import resolve_local_path
from lightning_meta.data.tokenization import check_tokenizer_record, tokenizer_record
from lightning_meta.learners.base import Learner

# Their home before the writing moved to its own module: earlier imports keep working.
from lightning_meta.training.preemption import (  # noqa: F401, E402
    SIGTERM_EXIT_CODE,
    AtomicCheckpointIO,
    PreemptionCheckpoint,
)


class CheckpointError(ValueError):
    """A checkpoint path that is not a readable local checkpoint."""


def check_local_checkpoint_path(path: str | Path) -> Path:
    """``path`` as a local file or sharded-checkpoint folder; URLs and missing paths are refused.

    ``"last"``/``"best"`` (Lightning's names for the trainer's own checkpoints) are not paths and
    are left to Lightning.
    """
    text = str(path)
    if "://" in text:
        raise CheckpointError(
            f"ckpt_path={text!r} is not a local path. Checkpoints are never downloaded (a checkpoint is a pickle and "
            "can run code): copy the file to this machine and give its path."
        )
    local = Path(text).expanduser()
    if not local.exists() and text in ("last", "best"):  # a name the trainer resolves, given to a path reader
        raise CheckpointError(
            f"{text!r} names the trainer's own {text} checkpoint (Trainer.fit/test(ckpt_path={text!r}), "
            f"--ckpt_path {text}); here give the path of a .ckpt file, e.g. "
            "lightning_logs/version_0/checkpoints/last.ckpt."
        )
    if not local.exists():
        raise CheckpointError(
            f"ckpt_path={text!r} does not exist. Give the path of a .ckpt file (to the trainer and the "
            "lightning-meta command, also 'last': the run's newest)."
        )
    return local


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (a local file), loaded with ``weights_only=True`` onto the CPU.

    A truncated file, a file that is not a checkpoint, or one that needs arbitrary unpickling gets
    an error that names the file and what to do, not torch's advice to turn off ``weights_only``.
    """
    local = check_local_checkpoint_path(path)
    if local.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is a folder (a sharded checkpoint?); hyper-parameters are read from single-file "
            "checkpoints. Consolidate it first (python -m lightning.fabric.utilities.consolidate_checkpoint DIR)."
        )
    try:
        # Memory-mapped where torch allows it (zip files): the hyper-parameters are read without every weight.
        checkpoint = torch.load(local, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(local))
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{str(path)!r} cannot be loaded safely: it holds objects other than tensors and plain data, or is not "
            "a checkpoint at all. Checkpoints written by lightning-meta load with weights_only=True; this file was "
            "written by other code or is damaged. Use another checkpoint; do not turn weights_only off for a file "
            "you did not write yourself."
        ) from None
    except Exception as error:  # noqa: BLE001 (random bytes reach the unpickler: KeyError, IndexError, ...)
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint ({local.stat().st_size} bytes): it is truncated (a copy or a "
            "save that did not finish) or not a checkpoint. Use another one, e.g. an earlier checkpoint in the same "
            f"folder. ({type(error).__name__}: {str(error).split('. ')[0]}.)"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{str(path)!r} is a torch file but not a Lightning checkpoint (no 'state_dict'). Give a .ckpt written "
            "by lightning-meta fit (lightning_logs/version_*/checkpoints/)."
        )
    return checkpoint


#: The option that lets a pretrained model folder run its own Python code (``auto_map`` in its config.json).
REMOTE_CODE = "trust_remote_code"


def take_out_remote_code(hparams: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``hparams`` read from a file with every ``trust_remote_code`` switched off, and the dotted keys that had
    it on (the learner's, an encoder config's, ...).

    A checkpoint is read ``weights_only`` so that a shared file cannot run code; its hyper-parameters must not
    switch on a model folder's own code either: only the caller may (:func:`refuse_remote_code`).
    """
    asked: list[str] = []

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, Mapping):
            cleaned = {}
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if key == REMOTE_CODE and item:
                    asked.append(where)
                    item = False
                cleaned[key] = clean(item, where)
            return cleaned
        if isinstance(value, list | tuple):
            return [clean(item, f"{path}.{index}") for index, item in enumerate(value)]
        return value

    return clean(hparams, ""), asked


def refuse_remote_code(asked: list[str], source: str, option: str) -> None:
    """Refuse a checkpoint whose hyper-parameters ask to run a model folder's own code (``asked``, from
    :func:`take_out_remote_code`) when the caller did not allow it; ``option`` says how the caller allows it."""
    if asked:
        raise CheckpointError(
            f"{source} asks to run its pretrained model's own Python code ({asked[0]}: true), and a checkpoint never "
            "switches that on by itself (it is read weights_only so that a shared file cannot run code). If you "
            f"trust that model folder's code, allow it yourself: {option}."
        )


#: Where a MetaLearningModule's state_dict keeps its learner's weights.
LEARNER_PREFIX = "learner."
#: The key under ``checkpoint["lightning_meta"]`` that records the frozen weights a checkpoint leaves out.
REBUILT_WEIGHTS = "rebuilt_weights"


def weights_fingerprint(module: nn.Module, names: Iterable[str]) -> str:
    """16 hex digits of sha256 over the named weights of ``module``: names, dtypes, shapes and bytes."""
    weights = dict(module.named_parameters(remove_duplicate=False))
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = weights[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def fingerprint_rebuilt_weights(learner: Learner) -> None:
    """Fingerprint the weights ``learner`` rebuilds (:meth:`Learner.rebuilt_weights`) as built, for every later save
    and load of it to use.

    Taken when the learner is built, before a precision plugin casts it (``64-true``, ``bf16-true``): a load
    rebuilds the weights in the learner's own dtype and compares them with this fingerprint, not with the cast ones.
    """
    names = learner.rebuilt_weights()
    if names:
        _cached_fingerprint(learner, names)


def leave_out_rebuilt_weights(checkpoint: dict[str, Any], learner: Learner, prefix: str) -> None:
    """Drop from ``checkpoint["state_dict"]`` the weights ``learner`` rebuilds by itself (a pretrained LoRA
    base: 538 of 540 MB for SmolLM2-135M), recording their names, origin and fingerprint so that
    :func:`restore_rebuilt_weights` can put them back and check that they are the same."""
    names = learner.rebuilt_weights()
    state = checkpoint["state_dict"]
    if not names or any(prefix + name not in state for name in names):
        return
    for name in names:
        del state[prefix + name]
    pretrained = getattr(learner, "pretrained", None)
    checkpoint.setdefault("lightning_meta", {})[REBUILT_WEIGHTS] = {
        "from": pretrained,
        # Where `from` was found, absolute: a relative path read from another folder finds nothing (see rebuilt_base).
        "folder": _absolute_folder(pretrained),
        "names": names,
        "fingerprint": _cached_fingerprint(learner, names),
    }


def rebuilt_base(checkpoint: Mapping[str, Any], given: str | None = None) -> str | None:
    """The pretrained model a checkpoint that leaves out its frozen weights should rebuild them from: ``given``
    (the caller's choice), else the one its learner names when that is found here, else the folder it was found
    in at training (recorded absolute, for a relative path read from another folder). ``None``: the learner's own
    setting stands (nothing left out, or nothing better known)."""
    record = (checkpoint.get("lightning_meta") or {}).get(REBUILT_WEIGHTS) or {}
    if given is not None or not record:
        return given
    named, folder = record.get("from"), record.get("folder")
    if named is None or folder is None or named == folder or _absolute_folder(named) is not None:
        return None
    if not Path(folder).is_dir():
        return None
    rank_zero_info(f"The checkpoint's pretrained model {named!r} is not found from here; rebuilding from {folder}.")
    return folder


def _absolute_folder(pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    try:
        return str(resolve_local_path(pretrained).resolve())
    except FileNotFoundError:
        return None


def restore_rebuilt_weights(
    state: dict[str, Any], saved: Mapping[str, Any] | None, learner: Learner, prefix: str
) -> None:
    """Put the weights a checkpoint left out (:func:`leave_out_rebuilt_weights`) back into ``state`` from
    ``learner``, which rebuilt them, after checking they are the ones it was trained with."""
    record = (saved or {}).get(REBUILT_WEIGHTS)
    pretrained = getattr(learner, "pretrained", None)
    if not record:
        missing = [name for name in learner.rebuilt_weights() if prefix + name not in state]
        if missing:
            raise CheckpointError(
                f"The checkpoint lacks {len(missing)} frozen weights of the learner's pretrained model "
                f"({pretrained!r}; {missing[:3]}) and holds no record of leaving them out (lightning_meta."
                f"{REBUILT_WEIGHTS}), so nothing says which model they came from: it was cut down or edited by "
                "other code. Use a checkpoint as lightning-meta fit wrote it (another .ckpt of the run)."
            )
        return
    names = list(record["names"])
    weights = dict(learner.named_parameters(remove_duplicate=False))
    absent = [name for name in names if name not in weights or weights[name].requires_grad]
    if absent:
        raise CheckpointError(
            f"The checkpoint leaves out {len(names)} frozen weights of its pretrained model ({record['from']!r}), "
            f"to be rebuilt from it, but this learner does not hold them frozen ({absent[:3]}). Load it with the "
            "learner settings it was saved with (its hyper-parameters)."
        )
    fingerprint = _cached_fingerprint(learner, names)  # a later save of this learner reuses it
    if fingerprint != record["fingerprint"]:
        here, there = _absolute_folder(pretrained), record.get("folder")
        if here is not None and here == there:
            problem = (
                f"are rebuilt from {here}, but what it holds now is not what the run was trained on (fingerprint "
                f"{fingerprint}, saved {record['fingerprint']}): its files changed since, or the learner is built "
                f"in another dtype (now {getattr(learner, 'dtype', '?')}). Put the original model back there, or "
                "point the learner's pretrained at a copy of it"
            )
        else:
            problem = (
                f"are rebuilt from the learner's pretrained model, but the one loaded now ({pretrained!r}) is not "
                f"the one it was trained on ({record['from']!r}): fingerprint {fingerprint}, saved "
                f"{record['fingerprint']}. Point the learner's pretrained at that model"
            )
        raise CheckpointError(
            f"The checkpoint holds only the trained weights; its {len(names)} frozen weights {problem} "
            "(--model.learner.init_args.pretrained=FOLDER; lightning-meta export: --pretrained FOLDER)."
        )
    for name in names:
        state[prefix + name] = weights[name].detach()


def _cached_fingerprint(learner: Learner, names: list[str]) -> str:
    # Frozen weights never change in training: hash them once per learner (0.5 s for SmolLM2-135M).
    key = tuple(names)
    cached = learner.__dict__.get("_rebuilt_fingerprint")
    if cached is None or cached[0] != key:
        cached = (key, weights_fingerprint(learner, names))
        learner.__dict__["_rebuilt_fingerprint"] = cached
    return cached[1]


def write_module_state(
    checkpoint: dict[str, Any], learner: Learner, frozen_dtypes: Mapping[str, torch.dtype], *, sharded: bool
) -> None:
    """What the host module adds to and leaves out of ``checkpoint`` as it is saved: the tokenizer's record; a
    frozen base kept in a lower precision saved in its own dtype (``frozen_dtypes``, by the learner's parameter
    name); the frozen weights the learner rebuilds left out (not when ``sharded``: FSDP2's strategy loads the
    state itself, before :func:`read_module_state`)."""
    tokenizer = getattr(learner, "tokenizer", None)
    if isinstance(tokenizer, str):
        checkpoint["lightning_meta"] = tokenizer_record(tokenizer)
    state = checkpoint.get("state_dict", {})
    for name, dtype in frozen_dtypes.items():
        if LEARNER_PREFIX + name in state:
            state[LEARNER_PREFIX + name] = state[LEARNER_PREFIX + name].to(dtype)
    if not sharded:
        leave_out_rebuilt_weights(checkpoint, learner, LEARNER_PREFIX)


def read_module_state(checkpoint: dict[str, Any], learner: Learner) -> None:
    """The host module's side of loading ``checkpoint``: its tokenizer record checked against the learner's, and
    the frozen weights it left out restored from the learner's rebuilt model."""
    saved = checkpoint.get("lightning_meta", {})
    tokenizer = getattr(learner, "tokenizer", None)
    if isinstance(tokenizer, str):
        check_tokenizer_record(saved, tokenizer, "The checkpoint's learner")
    if "state_dict" in checkpoint:  # a sharded checkpoint's weights were loaded by the strategy (never left out)
        restore_rebuilt_weights(checkpoint["state_dict"], saved, learner, LEARNER_PREFIX)
