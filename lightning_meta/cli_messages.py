"""What the ``lightning-meta`` command says: its one-line errors, the names it accepts for algorithms and
datamodules (any case, did you mean), and the first lines of a run. :mod:`lightning_meta.cli` parses and runs."""

from __future__ import annotations

import re
import traceback
from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from lightning.pytorch.utilities import rank_zero_info

import lightning_meta.datamodules
from lightning_meta import _compat, algorithms
from lightning_meta.version import VERSION

_PACKAGE_ROOTS = tuple(
    str(Path(path).resolve())
    for path in (
        Path(__file__).parent,
        Path(algorithms.__file__).parent,
        Path(lightning_meta.datamodules.__file__).parent,
    )
)


def unknown_class_kind(message: str) -> str | None:
    """``"algorithm"`` or ``"datamodule"`` when a parser error says that option's class did not resolve."""
    if not _compat.is_unresolved_class_error(message):
        return None
    if 'key "model.algorithm"' in message or "MetaAlgorithm" in message:
        return "algorithm"
    if 'key "data"' in message:
        return "datamodule"
    return None


def text_read_as_mapping(message: str, command_line: list[str]) -> str | None:
    """One line saying to quote the text, when ``message`` is about a text option that got a mapping."""
    found = _compat.text_option_given_mapping(message)
    if found is None:
        return None
    key, mapping = found
    names = [arg[2:].split("=", 1)[0] for arg in command_line if arg.startswith("--")]
    name = next((name for name in names if name == key or name.endswith(f".{key}")), None)
    value = None if name is None else argument_value(command_line, f"--{name}")
    if name is None or value is None or "." not in name:  # not typed as --parent.key=value
        return f"{key} got the mapping {mapping}: YAML reads ': ' and braces as a mapping; quote the text ('...')."
    parent, key = name.rsplit(".", 1)
    quoted = value.replace("'", "''")
    # Quotes around the value itself would stay in the text (jsonargparse keeps a str option's quotes).
    return (
        f"--{name} got the mapping {mapping}: the command line reads this option as YAML, where ': ' and braces "
        f"make a mapping. Give the text quoted inside its parent: --{parent}=\"{{{key}: '{quoted}'}}\" (or in a "
        f"config file: {key}: '{quoted}')."
    )


def taken_folder_message(trainer: Any) -> str:
    """Why this run's folder already holds another run's ``config.yaml``, and what to do."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    taken = f"{trainer.log_dir} already holds the config.yaml of another run, and this run would overwrite it and its "
    own_folder = "give each run its own folder (--trainer.default_root_dir=runs/NEW)"
    if not trainer.loggers:
        return (
            f"{taken}checkpoints: with the logger off (--trainer.logger=false) every run writes straight into "
            f"--trainer.default_root_dir. Either {own_folder}, or turn the logger on: each run then gets its own "
            "lightning_logs/version_N."
        )
    logger = trainer.loggers[0]
    if isinstance(logger, TensorBoardLogger | CSVLogger):  # a free version is claimed unless one is given
        return (
            f"{taken}checkpoints: the logger's version is given (version={logger.version!r}). Give each run its own "
            f"version, or leave it out (each run then gets the next free lightning_logs/version_N), or {own_folder}."
        )
    return f"{taken}checkpoints: the {type(logger).__name__} makes no version_N folder. Please {own_folder}."


#: The data options the first lines show (the datamodule reports its held-out splits itself).
_DATA_OPTIONS = ("tokenizer", "ways", "shots", "queries", "meta_batch_size", "num_val_tasks", "num_test_tasks")


def announce_run(subcommand: str, trainer: Trainer, model: Any, datamodule: Any, threads: str) -> None:
    """The first lines of a run, each once: what runs, on which model, data and hardware."""
    lines = [f"lightning-meta {VERSION}: {subcommand} {describe_component(model)}"]
    algorithm = getattr(model, "algorithm", None)
    if algorithm is not None:
        lines[0] = f"lightning-meta {VERSION}: {subcommand} with {describe_component(algorithm)}"
        lines.append(f"learner: {describe_learner(model.learner)}")
    if datamodule is not None:
        lines.append(f"data: {describe_component(datamodule, _DATA_OPTIONS)}")
    strategy = trainer.strategy
    lines.append(
        f"device: {trainer.accelerator.__class__.__name__.removesuffix('Accelerator').lower()} x {trainer.num_devices}"
        f" per node x {trainer.num_nodes} node{'s' * (trainer.num_nodes != 1)}, strategy "
        f"{strategy.__class__.__name__}, precision {trainer.precision}; {threads}"
    )
    rank_zero_info("\n".join(lines))


def describe_component(component: Any, keys: tuple[str, ...] | None = None) -> str:
    """``Name(option=value, ...)`` from the options it was built with (its saved hyper-parameters),
    those set and plain, or only ``keys``."""
    options = dict(getattr(component, "hparams", {}) or {})
    if isinstance(component, torch.nn.Module) and not options:
        from lightning_meta.training.config import NotConfigurable, to_config

        try:
            options = to_config(component).get("init_args", {})
        except NotConfigurable:
            options = {}
    if keys is not None:
        options = {name: options[name] for name in keys if name in options}
    shown = ", ".join(
        f"{name}={value}"
        for name, value in options.items()
        if not name.startswith("_") and value is not None and _is_plain(value)
    )
    return f"{type(component).__name__}({shown})"


def describe_learner(learner: Any) -> str:
    model = learner.model
    total = sum(parameter.numel() for parameter in model.parameters())
    fast = dict(model.named_parameters())
    fast_count = sum(fast[name].numel() for name in learner.fast_weight_names if name in fast)
    spec = getattr(learner, "fast_weights", None) or "all"
    return (
        f"{type(learner).__name__} over {type(model).__name__} ({total / 1e6:.2f}M parameters); fast weights "
        f"{spec!r}: {len(learner.fast_weight_names)} tensors, {fast_count / 1e6:.2f}M parameters"
    )


def _is_plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return len(value) <= 8 and all(isinstance(item, int | float | str) for item in value)
    return value is None or isinstance(value, bool | int | float | str)


def argument_value(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


class UnknownNameError(ValueError):
    """An algorithm or datamodule name that matches no known class, even ignoring case."""


#: The options that take a class by name, by the kind of class they take.
_NAMED_OPTIONS = {
    "algorithm": ("--model.algorithm", "--model.algorithm.class_path"),
    "datamodule": ("--data", "--data.class_path"),
}
#: How a user gives a class of their own, by kind.
_OWN_CLASS = {
    "algorithm": "a dotted path to your own MetaAlgorithm subclass (--model.algorithm=my_pkg.algos.MyAlgo)",
    "datamodule": "a dotted path to your own LightningDataModule subclass (--data=my_pkg.data.MyData)",
}


def known_algorithms() -> list[str]:
    """The algorithms' class names: built-ins and entry-point plugins."""
    return sorted({cls.__name__ for cls in algorithms.available().values()})


def known_datamodules() -> list[str]:
    """The class names of the datamodules this package ships (``lightning_meta.datamodules``), the abstract
    base left out."""
    from inspect import isabstract

    module = lightning_meta.datamodules
    return sorted(name for name in module.__all__ if not isabstract(getattr(module, name)))


def unknown_name_message(kind: str, given: str, known: list[str]) -> str:
    """Two lines: the unknown ``given`` name of a ``kind`` with the closest known names, then every known name."""
    from difflib import get_close_matches

    by_lower = {name.lower(): name for name in known}
    close = [by_lower[name] for name in get_close_matches(given.lower(), list(by_lower), n=3, cutoff=0.6)]
    guess = f"; did you mean {' or '.join(close)}?" if close else "."
    return (
        f"unknown {kind} {given!r}{guess}\n"
        f"Known {kind}s: {', '.join(known)} (any case on the command line); or {_OWN_CLASS[kind]}."
    )


def with_class_names(args: list[str], known: dict[str, list[str]]) -> list[str]:
    """``args`` with each algorithm and datamodule name typed in any case replaced by its class name
    (``--model.algorithm=reptile`` -> ``Reptile``), as the Python registry (``algorithms.get``) accepts it.

    Raises :class:`UnknownNameError` (two lines: did you mean, and the known names) for a plain name that
    matches none; dotted paths and YAML values are left to the parser.
    """
    named = list(args)
    for kind, options in _NAMED_OPTIONS.items():
        by_lower = {name.lower(): name for name in known[kind]}
        for index, arg in enumerate(named):
            option, equals, value = arg.partition("=")
            if option not in options:
                continue
            value_at = index if equals else index + 1
            if not equals:
                if index + 1 >= len(named):
                    continue
                value = named[index + 1]
            if not re.fullmatch(r"[A-Za-z_]\w*", value) or value in known[kind]:
                continue
            if value.lower() not in by_lower:
                raise UnknownNameError(unknown_name_message(kind, value, known[kind]))
            named[value_at] = f"{option}={by_lower[value.lower()]}" if equals else by_lower[value.lower()]
    return named


def own_error_message(error: BaseException) -> str | None:
    """``"Type: message"`` of the first error in ``error``'s chain that this package raised, else ``None``.

    Errors this package raises on purpose (bad options, bad data, diverged training) explain
    themselves; a traceback through jsonargparse and Lightning only hides the message. Errors
    raised anywhere else keep their traceback.
    """
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frames = traceback.extract_tb(current.__traceback__)
        if (
            isinstance(current, ValueError | TypeError | OSError | FloatingPointError | ImportError)
            and frames
            and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE_ROOTS)
        ):
            return f"{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return None
