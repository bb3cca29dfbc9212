"""The ``lightning-meta`` command: LightningCLI over :class:`MetaLearningModule` and any datamodule."""

from __future__ import annotations

import os
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_meta.datamodules  # noqa: F401  (imported so short class names resolve)
from lightning_meta import _compat, algorithms
from lightning_meta.cli_checkpoint import check_config_against_checkpoint, checkpoint_config
from lightning_meta.cli_messages import (
    UnknownNameError,
    announce_run,
    argument_value,
    known_algorithms,
    known_datamodules,
    own_error_message,
    taken_folder_message,
    text_read_as_mapping,
    unknown_class_kind,
    unknown_name_message,
    with_class_names,
)
from lightning_meta.training.checkpoints import load_checkpoint_file
from lightning_meta.training.module import MetaLearningModule
from lightning_meta.training.trainer import quiet_framework_noise, with_progress_bar

DEFAULT_CONFIG = "quickstart.yaml"
_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Subcommands that ``main`` runs before LightningCLI's parser (which knows only the run subcommands).
_HANDOFF_SUBCOMMANDS = ("export", "pretrain")
#: Runs lm-evaluation-harness's own command line with this package's model (``lightning-meta lm-eval --help``).
_LM_EVAL_SUBCOMMAND = "lm-eval"
#: Set to 1 to see the full traceback of the errors this command otherwise prints as one message.
TRACEBACK_VARIABLE = "LIGHTNING_META_TRACEBACK"
#: torch threads of a run unless OMP_NUM_THREADS or MKL_NUM_THREADS is set. torch's own default, a
#: thread per core that spins while it waits, ran the quick start over 6x slower beside another busy
#: process on a 2-core machine, and one thread was as fast alone (benchmarks/speed/shared_cpu.md).
DEFAULT_THREADS = 1
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DESCRIPTION = """\
lightning-meta: meta-learning ({algorithms}) for language models
with PyTorch Lightning. `lightning-meta fit` without --config runs the embedded quick start (first-order MAML
on a tiny GPT-2 over text domains of Python's standard library, ~4½ min on a CPU); `--config configs/X.yaml`
runs a use case; `lightning-meta fit --print_config` prints the full config to copy and edit. With
--ckpt_path, options typed on the command line or in --config win over the checkpoint's, which win over
the defaults. Runs use one torch thread unless OMP_NUM_THREADS is set (`OMP_NUM_THREADS=4 lightning-meta
fit` uses 4: worth it for larger models on an otherwise idle machine). Caches: $LIGHTNING_META_CACHE
(default ~/.cache/lightning_meta) and the `datasets` cache ($HF_DATASETS_CACHE); see the README's "Files
and caches".

The hand-off, two more subcommands: `lightning-meta export --ckpt_path CKPT --output_dir DIR` writes a
checkpoint as a Hugging Face folder (`lightning-meta export --help`); `lightning-meta pretrain --config
configs/pretrain_from_meta.yaml` continues ordinary causal-LM training from it (`lightning-meta pretrain
--help`; the same options and conventions as `fit`). `lightning-meta lm-eval --model_args checkpoint=CKPT
--tasks TASKS` evaluates a checkpoint, export or LoRA adapter with EleutherAI's lm-evaluation-harness: `lm-eval
run`'s options and results files (pip install "lightning-meta[eval]"; `lightning-meta lm-eval --help`)."""


def describe(known: dict[str, type]) -> str:
    """The command's description, naming the algorithms ``known`` (the registry: built-ins, then plugins)."""
    return DESCRIPTION.format(algorithms=", ".join(cls.__name__ for cls in known.values()))


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (the files of ``configs/``)."""
    return Path(str(files("lightning_meta.configs").joinpath(name)))


class MetaArgumentParser(LightningArgumentParser):
    """Adds the known algorithm names to errors about an unknown ``--model.algorithm``, and says to quote
    a text option that YAML read as a mapping.

    Args:
        command_line: the arguments as typed, to quote the user's own text back in errors.
    """

    def __init__(self, *args: Any, command_line: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command_line = command_line or []

    def add_subcommands(self, required: bool = True, dest: str = "subcommand", **kwargs: Any) -> Any:
        """LightningCLI's run subcommands; the usage line names the ones ``main`` runs before this parser too."""
        every = (*_RUN_SUBCOMMANDS, *_HANDOFF_SUBCOMMANDS, _LM_EVAL_SUBCOMMAND)
        kwargs.setdefault("metavar", "{" + ",".join(every) + "}")
        return super().add_subcommands(required=required, dest=dest, **kwargs)

    def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 (NoReturn in the base)
        text_as_mapping = text_read_as_mapping(message, self.command_line) if self.exit_on_error else None
        if text_as_mapping is not None:
            sys.stderr.write(f"lightning-meta: error: {text_as_mapping}\n")
            self.exit(2)
        given = _compat.unknown_subcommand(message) if self.exit_on_error else None
        if given is not None:  # the parser lists only the run subcommands
            problem = f"{given!r} is not a subcommand" if given else "no subcommand given"
            subcommands = ", ".join((*_RUN_SUBCOMMANDS, *_HANDOFF_SUBCOMMANDS, _LM_EVAL_SUBCOMMAND))
            sys.stderr.write(
                f"lightning-meta: error: {problem}; the subcommands are {subcommands} (lightning-meta --help).\n"
            )
            self.exit(2)
        kind = unknown_class_kind(message) if self.exit_on_error else None
        given = _compat.unresolved_class_name(message)
        if kind is not None and given is not None:  # a name from a config file (the command line's: main)
            known = known_algorithms() if kind == "algorithm" else known_datamodules()
            sys.stderr.write(f"lightning-meta: error: {unknown_name_message(kind, given, known)}\n")
            self.exit(2)
        super().error(message, ex)


class RunConfigCallback(SaveConfigCallback):
    """Saves the config that ran; refuses to overwrite another run's ``config.yaml``."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as error:
            if "to NOT exist" not in str(error):  # Lightning's wording for an existing config (2.6)
                raise
            raise FileExistsError(taken_folder_message(trainer)) from None


class MetaCLI(_compat.CLIWithoutCheckpointMerge):
    """LightningCLI with ``--test_after_fit`` (on by default), and ``--ckpt_path`` that respects the user.

    LightningCLI 2.6 merges a checkpoint's hyper-parameters *over* the parsed command line. Here
    the order is: options typed on the command line or in ``--config`` files win over the
    checkpoint's (model and datamodule), which win over the defaults; the saved ``config.yaml``
    is what ran. A checkpoint of another learner or model than the config's is refused.
    """

    def before_instantiate_classes(self) -> None:
        self._threads = use_cli_threads()
        config = self.config[self.subcommand] if self.subcommand else self.config
        link_data_tokenizer(config, self.model_tokenizer(config))

    def model_tokenizer(self, config: Namespace) -> str | None:
        """The tokenizer the model reads: the learner's ``tokenizer`` (``None``: it has none)."""
        return config.get("model.learner.init_args.tokenizer")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, with :class:`MetaProgressBar` unless the bar is off or the user chose one, and loggers that
        claim their ``version_N`` folder (:func:`_compat.claim_version_when_chosen`)."""
        config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        chosen = kwargs.get("callbacks", config.get("callbacks")) or []
        chosen = list(chosen) if isinstance(chosen, list) else [chosen]
        kwargs["callbacks"] = with_progress_bar(chosen, config.get("enable_progress_bar"))
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as error:  # a bad --trainer option: Lightning's message says which
            raise ValueError(f"--trainer options: {error}") from error
        # Runs started together in one folder get a version_N each.
        claimed = [_compat.claim_version_when_chosen(logger) for logger in trainer.loggers]
        self._fixed_log_dir = not (claimed and claimed[0])  # the logger off, or its version given
        return trainer

    def before_fit(self) -> None:
        if self._fixed_log_dir and self.save_config_callback and not self.save_config_kwargs.get("overwrite"):
            # Refused here as well as by RunConfigCallback, which Lightning calls only after the loggers have
            # begun writing into that folder.
            config = Path(self.trainer.log_dir) / self.save_config_kwargs.get("config_filename", "config.yaml")
            if config.exists():
                raise FileExistsError(taken_folder_message(self.trainer))
        announce_run(self.subcommand, self.trainer, self.model, self.datamodule, self._threads)

    before_validate = before_test = before_predict = before_fit

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (LightningArgumentParser)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, run the test set with the final weights and print mean ± 95%% CI.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
            return
        args = list(sys.argv[1:] if args is None else args)
        ckpt_path = argument_value(args, "--ckpt_path")
        if ckpt_path is None:
            self.config = parser.parse_args(args)
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None  # from a --config file
            if not ckpt_path:
                return
        subcommand = next((arg for arg in args if arg in _RUN_SUBCOMMANDS), None)
        if subcommand is None:
            self.config = parser.parse_args(args)
            return
        base, remote_code = checkpoint_config(parser, subcommand, ckpt_path)
        self.config = parser.parse_args(args, namespace=base)
        if base is not None:
            check_config_against_checkpoint(base[subcommand], self.config[subcommand], ckpt_path, remote_code)

    def test(self, **kwargs: Any) -> Any:
        """``Trainer.test`` without Lightning's table, which repeats the module's printed metrics (mean ± 95% CI
        with episode counts) as bare 15-digit floats."""
        return self.trainer.test(**kwargs | {"verbose": False})

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and self.trainer.state.finished:
            self.test(model=self.model, datamodule=self.datamodule)


def link_data_tokenizer(config: Namespace, tokenizer: str | None) -> None:
    """Give the data the model's ``tokenizer`` when the config leaves the data's unset (``None``).

    A default rather than LightningCLI's ``link_arguments``, which would take the option away from
    the user; the saved ``config.yaml`` then names the tokenizer that ran.
    """
    if "data.init_args.tokenizer" in config and config["data.init_args.tokenizer"] is None and tokenizer:
        config["data.init_args.tokenizer"] = tokenizer


def use_cli_threads() -> str:
    """Set torch (and the processes this run starts) to ``DEFAULT_THREADS`` unless the environment chose.

    Only the command does this: ``import lightning_meta`` leaves torch's threads alone. Returns the
    ``torch threads: N (source)`` line that :func:`announce_run` prints.
    """
    chosen_by = next((name for name in THREAD_VARIABLES if os.environ.get(name)), None)
    if chosen_by is None:
        torch.set_num_threads(DEFAULT_THREADS)
        os.environ["OMP_NUM_THREADS"] = str(DEFAULT_THREADS)  # DDP workers and launchers read it
        source = "lightning-meta's default; OMP_NUM_THREADS=N lightning-meta ... uses N"
    else:
        source = f"from {chosen_by}"
    return f"torch threads: {torch.get_num_threads()} ({source})"


class PretrainCLI(MetaCLI):
    """``lightning-meta pretrain``: ``fit`` of :class:`CausalLMPretraining`, with ``fit``'s conventions."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (LightningArgumentParser)
        """No ``--test_after_fit``: pretraining validates on held-out text and has no test episodes."""

    def after_fit(self) -> None:
        """Nothing after fit (no test set)."""

    def model_tokenizer(self, config: Namespace) -> str | None:
        """The tokenizer :class:`CausalLMPretraining` picks: its ``tokenizer``, else the one an ``init_from``
        checkpoint records, else the ``init_from`` folder itself (an export ships its tokenizer)."""
        model = config["model"]
        if model.get("tokenizer"):
            return model["tokenizer"]
        init_from = model.get("init_from")
        if init_from is None:
            return "embedded-bpe-4096"  # CausalLMPretraining's own for model_config
        if Path(init_from).expanduser().is_file():
            return (load_checkpoint_file(init_from).get("lightning_meta") or {}).get("tokenizer")
        return init_from


def with_default_config(args: list[str]) -> list[str]:
    """Put the embedded default config first when a run subcommand is given no ``--config``.

    Other arguments still override it: ``lightning-meta fit --model.algorithm=FOMAML``. With
    ``--ckpt_path`` the checkpoint's own options take the default's place.
    """
    if not args or args[0] not in _RUN_SUBCOMMANDS:
        return args
    if {arg.split("=")[0] for arg in args[1:]} & {"-c", "--config", "--ckpt_path"}:
        return args
    return [args[0], "--config", str(packaged_config(DEFAULT_CONFIG)), *args[1:]]


def main(args: list[str] | None = None) -> None:
    """The ``lightning-meta`` command (``lightning_meta.__main__.main`` answers ``--version`` first)."""
    known = algorithms.available()  # imports plugin algorithms, so their class names resolve
    given = list(sys.argv[1:] if args is None else args)
    try:
        named = with_class_names(given, {"algorithm": known_algorithms(), "datamodule": known_datamodules()})
    except UnknownNameError as error:
        sys.stderr.write(f"lightning-meta: error: {error}\n")
        sys.exit(2)
    if named != given:
        given = named
        if args is None:
            sys.argv[1:] = named
        else:
            args = named
    quiet_framework_noise()
    if given and given[0] in _HANDOFF_SUBCOMMANDS:
        _run_handled(lambda: _handoff(given[0], given[1:]))
        return
    if given[:1] == [_LM_EVAL_SUBCOMMAND]:
        _run_handled(lambda: _lm_eval(given[1:]))
        return
    if args is None:
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(list(args))
    _run_handled(
        lambda: MetaCLI(
            MetaLearningModule,
            LightningDataModule,
            subclass_mode_data=True,
            args=args,
            parser_class=MetaArgumentParser,
            parser_kwargs=parser_options(describe(known), given),
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": False},
            auto_configure_optimizers=False,
        )
    )


def parser_options(description: str, command_line: list[str]) -> dict[str, Any]:
    """LightningCLI's ``parser_kwargs``: the subcommands' parsers (where errors are reported) get their own."""
    return {
        "description": description,
        "command_line": command_line,
        **{subcommand: {"command_line": command_line} for subcommand in _RUN_SUBCOMMANDS},
    }


def _handoff(subcommand: str, args: list[str]) -> None:
    """``export`` (a function's arguments as options) or ``pretrain`` (``fit`` of the pretraining module)."""
    if subcommand == "export":
        from jsonargparse import auto_cli

        from lightning_meta.handoff.export import export

        auto_cli(export, args=args, as_positional=False)
        return
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    PretrainCLI(
        CausalLMPretraining,
        LightningDataModule,
        subclass_mode_data=True,
        args=["fit", *args],
        parser_class=MetaArgumentParser,
        parser_kwargs=parser_options(CausalLMPretraining.__doc__.split("\n")[0], args),
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": False},
        auto_configure_optimizers=False,
    )


def _lm_eval(args: list[str]) -> None:
    """``lm-eval``: lm-evaluation-harness's own command line, with this package's model registered (the import
    names the ``[eval]`` extra when lm-eval is missing)."""
    from lightning_meta.handoff.harness import run_command

    run_command(args)


def _run_handled(run: Any) -> None:
    """``run()``, printing this package's own errors as one line (exit status 2)."""
    try:
        run()
    except Exception as error:  # noqa: BLE001 (re-raised unless it is one of this package's own messages)
        message = own_error_message(error)
        if message is None or os.environ.get(TRACEBACK_VARIABLE) == "1":
            raise
        sys.stderr.write(f"lightning-meta: error: {message}\n(Set {TRACEBACK_VARIABLE}=1 to see the traceback.)\n")
        sys.exit(2)
