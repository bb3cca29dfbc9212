"""The training progress bar: meta-training steps out of ``max_steps``, with the step's metrics."""

from __future__ import annotations

import logging
from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

#: The logger whose lines (Lightning's and this package's ``rank_zero_info``) go through the bars while they are open.
LOGGER = "lightning.pytorch"


class MetaProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of ``max_steps`` across epochs.

    Lightning's own bar counts the batches of an epoch and reads ``Epoch 2/-2`` for a run bounded
    by ``max_steps``. This one reads ``Meta-training: 120/300`` (a module's ``progress_label`` instead, if
    it has one: ``Pretraining`` under ``lightning-meta pretrain``) and shows the metrics the module puts
    on the bar without their ``train/`` prefix: ``query_loss`` and, for the MAML family on the steps
    Lightning logs, ``support_loss_pre`` / ``support_loss_post`` (the support loss before and after
    the inner loop). A run bounded by epochs keeps Lightning's per-epoch count.

    Lines logged while a bar is open (Lightning's and this package's messages) are written through
    the bars (``tqdm.write``: the bars are cleared, the line written, the bars drawn again), so no
    message is glued to a bar on a terminal.

    Example::

        trainer = Trainer(max_steps=300, callbacks=[MetaProgressBar()])
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        logger = logging.getLogger(LOGGER)
        self._replaced = [
            (index, handler)
            for index, handler in enumerate(logger.handlers)
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        ]
        for index, handler in self._replaced:
            logger.handlers[index] = _ThroughTheBars(handler)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = logging.getLogger(LOGGER)
        for index, handler in getattr(self, "_replaced", []):
            if index < len(logger.handlers) and isinstance(logger.handlers[index], _ThroughTheBars):
                logger.handlers[index] = handler
        self._replaced = []
        super().teardown(trainer, pl_module, stage)

    def on_train_start(self, *args: Any) -> None:
        super().on_train_start(*args)
        self._counting_steps = False

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not _bounded_by_steps(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        if self._counting_steps and not self._leave:  # one bar for the whole run: a reset would restart its clock
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step  # resumed runs start where they stopped
        # A module may name its run (``CausalLMPretraining``: "Pretraining"); meta-learning modules do not.
        self.train_progress_bar.set_description(getattr(trainer.lightning_module, "progress_label", "Meta-training"))
        self._counting_steps = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not _bounded_by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, *args)
            return
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict]:
        """The module's progress-bar metrics, ``train/`` prefix dropped; no logger version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {name.removeprefix("train/"): value for name, value in metrics.items()}


class _ThroughTheBars(logging.Handler):
    """A stream handler's lines, written with ``tqdm.write`` (which clears and redraws the open bars)."""

    def __init__(self, handler: logging.StreamHandler) -> None:
        super().__init__(handler.level)
        self.handler = handler
        self.filters = handler.filters

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Tqdm.write(self.handler.format(record), file=self.handler.stream)
        except Exception:  # noqa: BLE001 (logging's own convention: report, never raise)
            self.handleError(record)


def _bounded_by_steps(trainer: Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0
