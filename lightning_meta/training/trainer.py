"""The CLI's quiet defaults for a Trainer built in Python: :class:`Trainer` and :func:`quiet_framework_noise`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch.callbacks import Callback, ProgressBar

from lightning_meta import _compat
from lightning_meta.training.progress import MetaProgressBar

#: Framework messages a user of this package cannot act on, each matched by logger, source file and
#: wording (Lightning 2.6): the cloud-logger and cloud-checkpoint advertisements, and the accelerator lines that the
#: command's device line replaces. Nothing else from Lightning is hidden.
_FRAMEWORK_LINES = (
    ("trainer/connectors/logger_connector/logger_connector.py", re.compile(r"💡 Tip: For seamless cloud logging")),
    ("trainer/connectors/callback_connector.py", re.compile(r"💡 Tip: For seamless cloud uploads")),
    ("trainer/setup.py", re.compile(r"(GPU|TPU|HPU) available: ")),
)


def _drop_framework_lines(record: logging.LogRecord) -> bool:
    source = Path(record.pathname).as_posix()
    message = record.getMessage()
    return not any(
        source.endswith(f"lightning/pytorch/{path}") and pattern.match(message) for path, pattern in _FRAMEWORK_LINES
    )


def quiet_framework_noise() -> None:
    """Hide the framework messages listed in ``_FRAMEWORK_LINES`` and the ``LeafSpec`` deprecation that torch
    raises inside Lightning's own code (not the user's). Used by the command and by :class:`Trainer`."""
    _compat.hide_lightning_pytree_deprecation()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _drop_framework_lines not in logger.filters:
        logger.addFilter(_drop_framework_lines)


def with_progress_bar(callbacks: list[Callback], enable_progress_bar: bool | None) -> list[Callback]:
    """``callbacks`` and a :class:`MetaProgressBar`, unless the bar is off or ``callbacks`` hold a bar already."""
    if enable_progress_bar is False or any(isinstance(callback, ProgressBar) for callback in callbacks):
        return callbacks
    return [*callbacks, MetaProgressBar()]


class Trainer(lightning.Trainer):
    """``lightning.Trainer`` that looks like ``lightning-meta fit``: the same progress bar (steps out of
    ``max_steps``, not ``Epoch 2/-2``), no model summary (its ``Total FLOPs: 0`` counts nothing a
    meta-learner runs), and none of the framework lines the command hides (accelerator lines, the
    cloud-logging tip, torch's ``LeafSpec`` deprecations inside Lightning). Every argument is
    ``lightning.Trainer``'s; give ``enable_model_summary=True`` or your own bar to have them back.

    Example::

        trainer = lightning_meta.Trainer(max_steps=300, val_check_interval=100)
        trainer.fit(MetaLearningModule(learner, FOMAML()), datamodule=SinusoidDataModule())
    """

    def __init__(
        self,
        *args: Any,
        callbacks: list[Callback] | Callback | None = None,
        enable_model_summary: bool | None = False,
        **kwargs: Any,
    ) -> None:
        quiet_framework_noise()
        chosen = [] if callbacks is None else [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        chosen = with_progress_bar(chosen, kwargs.get("enable_progress_bar"))
        super().__init__(*args, callbacks=chosen, enable_model_summary=enable_model_summary, **kwargs)
