"""The ``lightning-meta`` command: LightningCLI over :class:`MetaLearningModule` and any datamodule."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_meta.datamodules  # noqa: F401  (imported so short class names resolve)
from lightning_meta import algorithms
from lightning_meta.module import MetaLearningModule

DEFAULT_CONFIG = "quickstart.yaml"
_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (the files of ``configs/``)."""
    return Path(str(files("lightning_meta.configs").joinpath(name)))


class MetaArgumentParser(LightningArgumentParser):
    """Adds the known algorithm names to errors about ``--model.algorithm``."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 (NoReturn in the base)
        if "MetaAlgorithm" in message:
            names = sorted({cls.__name__ for cls in algorithms.available().values()})
            message += (
                f"\nKnown algorithms: {', '.join(names)}. Give one of these class names, or a dotted path to "
                "your own MetaAlgorithm subclass (--model.algorithm=my_pkg.algos.MyAlgo)."
            )
        super().error(message, ex)


class MetaCLI(LightningCLI):
    """LightningCLI with ``--test_after_fit`` (on by default): ``fit`` ends by testing the result."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (LightningArgumentParser)
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After fit, run the test set with the final weights and print mean ± 95%% CI.",
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit") and self.trainer.state.finished:
            self.trainer.test(self.model, datamodule=self.datamodule)


def with_default_config(args: list[str]) -> list[str]:
    """Put the embedded default config first when a run subcommand is given no ``--config``.

    Other arguments still override it: ``lightning-meta fit --model.algorithm=FOMAML``.
    """
    if not args or args[0] not in _RUN_SUBCOMMANDS:
        return args
    if any(arg.split("=")[0] in ("-c", "--config") for arg in args[1:]):
        return args
    return [args[0], "--config", str(packaged_config(DEFAULT_CONFIG)), *args[1:]]


def main(args: list[str] | None = None) -> None:
    """Entry point of ``lightning-meta`` and ``python -m lightning_meta``."""
    algorithms.available()  # import plugin algorithms so their class names resolve
    if args is None:
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(list(args))
    MetaCLI(
        MetaLearningModule,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        parser_class=MetaArgumentParser,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
