"""The host LightningModule: any algorithm, any learner, Lightning's training machinery."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_meta.algorithms import MAML, MetaAlgorithm
from lightning_meta.config import NotConfigurable, to_config
from lightning_meta.learners import Learner
from lightning_meta.metrics import EpisodeStatistics
from lightning_meta.tasks import TaskBatch

_EVAL_STAGES = ("val", "test")


class MetaLearningModule(LightningModule):
    """Meta-trains ``learner`` with ``algorithm``; evaluates by adapting on fixed episodes.

    Args:
        learner: the model and its loss (e.g. ``RegressionLearner(MLP())``).
        algorithm: a :class:`MetaAlgorithm`; ``MAML()`` when omitted.
        optimizer: the meta-optimizer, called with the trainable parameters
            (LightningCLI: ``--optimizer`` style ``class_path``/``init_args``).
        lr_scheduler: optional scheduler, called with the optimizer; stepped every step.
        eval_inner_steps: adaptation steps at validation/test/predict; overrides the algorithm's.

    Logs ``train/query_loss`` every step and, for validation and test, ``{stage}/query_loss_pre``
    and ``{stage}/query_loss_post`` (plus ``_acc_`` for classification), each with a ``_ci95``
    half-width over episodes. Adaptation works in ``validate``/``test``/``predict`` under
    Lightning's default ``inference_mode``.
    """

    def __init__(
        self,
        learner: Learner,
        algorithm: MetaAlgorithm | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_inner_steps: int | None = None,
    ) -> None:
        super().__init__()
        # Built here, not as a default instance: jsonargparse would carry a default instance's
        # init args over to a different class chosen on the command line.
        algorithm = MAML() if algorithm is None else algorithm
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ValueError(f"eval_inner_steps must be >= 1 or None, got {eval_inner_steps}.")
        self.learner = learner
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.eval_inner_steps = eval_inner_steps
        algorithm.check_learner(learner)
        self._save_hyperparameters(algorithm)
        self.episode_stats = nn.ModuleDict(
            {
                f"{stage}_{name}_{when}": EpisodeStatistics()
                for stage in _EVAL_STAGES
                for name in learner.metric_names
                for when in ("pre", "post")
            }
        )

    def _save_hyperparameters(self, algorithm: MetaAlgorithm) -> None:
        if _given_hyperparameters.get() is not None:  # LightningCLI hands over the config it parsed
            self.save_hyperparameters()
            return
        try:
            hparams = {
                "learner": to_config(self.learner),
                "algorithm": to_config(algorithm),
                "optimizer": to_config(self.optimizer),
                "lr_scheduler": to_config(self.lr_scheduler),
                "eval_inner_steps": self.eval_inner_steps,
                # Lets load_from_checkpoint rebuild the components from plain data, with
                # torch.load's default weights_only=True.
                "_instantiator": "lightning.pytorch.cli.instantiate_module",
            }
        except NotConfigurable as error:
            rank_zero_warn(
                f"Hyper-parameters not saved in full ({error}); pass learner=... (and the others) to "
                "MetaLearningModule.load_from_checkpoint."
            )
            self.save_hyperparameters(ignore=["learner", "algorithm", "optimizer", "lr_scheduler"])
            return
        self.save_hyperparameters(hparams)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer([p for p in self.learner.parameters() if p.requires_grad])
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        out = self.algorithm.meta_loss(self.learner, batch)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"The meta-loss is {out.loss.item()} at step {self.global_step} (metrics: "
                f"{ {k: v.item() for k, v in out.metrics.items()} }). Lower the meta learning rate or "
                "inner_lr, or enable gradient clipping (--trainer.gradient_clip_val). Checkpoints already "
                "saved are untouched."
            )
        self.log_dict(
            {f"train/{name}": value for name, value in out.metrics.items()}, batch_size=len(batch), prog_bar=True
        )
        return out.loss

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> list[Tensor]:
        """Query outputs after adapting to each episode's support (logits for ProtoNet)."""
        with torch.inference_mode(False):
            batch = batch.detached_clone()
            return [
                self.algorithm.predict(self.learner, episode, self.eval_inner_steps) for episode in batch.episodes()
            ]

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        # Lightning evaluates under inference_mode; the inner loop needs autograd and ordinary
        # (non-inference) tensors, so leave inference mode and copy the batch.
        with torch.inference_mode(False):
            batch = batch.detached_clone()
            for episode in batch.episodes():
                figures = self.algorithm.evaluate(self.learner, episode, self.eval_inner_steps)
                for key, value in figures.items():
                    self.episode_stats[f"{stage}_{key}"].update(value)

    def on_validation_epoch_end(self) -> None:
        self._log_episode_stats("val")

    def on_test_epoch_end(self) -> None:
        self._log_episode_stats("test")

    def _log_episode_stats(self, stage: str) -> None:
        summary = []
        for key, statistic in self.episode_stats.items():
            if not key.startswith(f"{stage}_") or statistic.update_count == 0:
                continue
            mean, ci95, episodes = statistic.compute()
            name = f"{stage}/query_{key.removeprefix(f'{stage}_')}"
            self.log(name, mean.float(), sync_dist=False)
            self.log(f"{name}_ci95", ci95.float(), sync_dist=False)
            summary.append(f"{name} = {mean.item():.4f} ± {ci95.item():.4f} ({int(episodes)} episodes)")
            statistic.reset()
        if summary and stage == "test" and not self.trainer.sanity_checking:
            rank_zero_info("Post-adaptation results (mean ± 95% CI over episodes):\n  " + "\n  ".join(summary))
