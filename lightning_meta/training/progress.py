"""The training progress bar: meta-training steps out of ``max_steps``, with the step's figures."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class MetaProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of ``max_steps`` across epochs.

    Lightning's own bar counts the batches of an epoch and reads ``Epoch 2/-2`` for a run bounded
    by ``max_steps``. This one reads ``Meta-training: 120/300`` (a module's ``progress_label`` instead, if
    it has one: ``Pretraining`` under ``lightning-meta pretrain``) and shows the figures the module puts
    on the bar without their ``train/`` prefix: ``query_loss`` and, for the MAML family on the steps
    Lightning logs, ``support_loss_pre`` / ``support_loss_post`` (the support loss before and after
    the inner loop). A run bounded by epochs keeps Lightning's per-epoch count.

    Example::

        trainer = Trainer(max_steps=300, callbacks=[MetaProgressBar()])
    """

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
        """The module's progress-bar figures, ``train/`` prefix dropped; no logger version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {name.removeprefix("train/"): value for name, value in metrics.items()}


def _bounded_by_steps(trainer: Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0
