"""``--ckpt_path`` in the CLI: the checkpoint's own model and data options as the base the command line and
config files are parsed over, and the checks that what the user chose still fits the checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from lightning_meta import _compat
from lightning_meta.training.checkpoint_loading import saved_hyperparameters
from lightning_meta.training.checkpoints import check_local_checkpoint_path, load_checkpoint_file, refuse_remote_code


def checkpoint_config(
    parser: LightningArgumentParser, subcommand: str, ckpt_path: str
) -> tuple[Namespace | None, list[str]]:
    """The checkpoint's model and datamodule options over the defaults (``None``: nothing saved), and the
    options that asked to run a model folder's own code (``trust_remote_code``), which are switched off here."""
    if ckpt_path in ("last", "best", "hpc", "registry"):  # Lightning's names, resolved by the trainer
        return None, []
    if Path(ckpt_path).expanduser().is_dir():
        check_local_checkpoint_path(ckpt_path)
        return None, []
    checkpoint = load_checkpoint_file(ckpt_path)
    saved = {}
    remote_code = []
    for key, hparams in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        # Remote code switched off here: only the command line or the user's config may switch it on (parse).
        values, asked = saved_hyperparameters(checkpoint, ckpt_path, key=hparams)
        values.pop("_instantiator", None)
        where = key
        if "_class_path" in values:
            values = {"class_path": values.pop("_class_path"), "init_args": values}
            where = f"{key}.init_args"
        remote_code += [f"{where}.{path}" for path in asked]
        if values:
            saved[key] = values
    if not saved:
        return None, remote_code
    try:
        base = _compat.parse_object_unvalidated(parser, {"subcommand": subcommand, subcommand: saved})
    except SystemExit:
        sys.stderr.write(
            f"The hyper-parameters saved in {ckpt_path} do not fit this version's options (above). Give the "
            "config the checkpoint was trained with: --config config.yaml from its run folder.\n"
        )
        raise
    _dataclass_values_as_dicts(base)
    return base, remote_code


def check_config_against_checkpoint(
    saved: Namespace, chosen: Namespace, ckpt_path: str, remote_code: list[str]
) -> None:
    """Refuse a parsed config (``chosen``, one subcommand's) whose learner is not the checkpoint's (``saved``), or
    that leaves on a model folder's own code that only the checkpoint asked for (``remote_code``, from
    :func:`checkpoint_config`): only the command line or the user's own config may switch it on."""
    _check_same_learner(saved, chosen, ckpt_path)
    not_allowed = [key for key in remote_code if _value_at(chosen, key) is not True]
    if not_allowed:
        refuse_remote_code(not_allowed, f"The checkpoint {ckpt_path}", f"--{not_allowed[0]}=true")


def _dataclass_values_as_dicts(config: Namespace, in_init_args: bool = False) -> None:
    """Turn the options of a class's ``init_args`` that are dataclasses (``lora: LoraSettings``) into plain dicts.

    jsonargparse (4.53) cannot merge a later value (a ``--config`` file's ``lora: {r: 8}``) into an optional
    dataclass option that the base namespace holds as a namespace ("Not a valid subclass of LoraSettings"); a
    dict there merges as the config gives it.
    """
    for name, value in vars(config).items():
        if not isinstance(value, Namespace):
            continue
        if in_init_args and "class_path" not in value:
            config[name] = value.as_dict()
        else:
            _dataclass_values_as_dicts(value, in_init_args=name == "init_args")


def _value_at(config: Namespace, dotted: str) -> Any:
    """The value at ``dotted`` in ``config``, through namespaces and dicts (``None`` where it is missing)."""
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Namespace | dict):
            return None
        value = value.get(part)
    return value


def _check_same_learner(saved: Namespace, chosen: Namespace, ckpt_path: str) -> None:
    """Refuse a config whose learner (or model inside it) is another class than the checkpoint's."""
    for key in ("learner", "learner.init_args.model"):
        before, after = saved.get(f"model.{key}"), chosen.get(f"model.{key}")
        if isinstance(before, Namespace) and isinstance(after, Namespace) and before.class_path != after.class_path:
            raise ValueError(
                f"The checkpoint {ckpt_path} holds a {key.split('.')[-1]} of class {before.class_path}, but the "
                f"config asks for {after.class_path}. Give the config it was trained with (config.yaml in its run "
                "folder), or leave the learner out of the command line and config so the checkpoint's is used."
            )
    before = saved.get("model.learner.init_args.model_config") or {}
    after = chosen.get("model.learner.init_args.model_config") or {}
    if before.get("model_type") and after.get("model_type") and before["model_type"] != after["model_type"]:
        raise ValueError(
            f"The checkpoint {ckpt_path} holds a {before['model_type']!r} model, but the config asks for "
            f"{after['model_type']!r}. Give the config it was trained with (config.yaml in its run folder)."
        )
