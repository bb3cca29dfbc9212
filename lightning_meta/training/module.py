"""The host LightningModule: any algorithm, any learner, Lightning's training machinery."""

from __future__ import annotations

import io
import json
import os
import platform
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from lightning_meta._compat import attached_trainer, cli_hyperparameters
from lightning_meta.data.local_files import write_file_atomically
from lightning_meta.data.tasks import PADDING_KEY, Episode, TaskBatch, generation_rule
from lightning_meta.data.tokenization import check_tokenizer, fingerprint_of
from lightning_meta.learners.base import Learner, check_sequence_length
from lightning_meta.training import scaling
from lightning_meta.training.algorithm import MetaAlgorithm
from lightning_meta.training.checkpoints import (
    LEARNER_PREFIX,
    PreemptionCheckpoint,
    fingerprint_rebuilt_weights,
    leave_out_rebuilt_weights,
    load_checkpoint_file,
    rebuilt_base,
    refuse_remote_code,
    restore_rebuilt_weights,
    take_out_remote_code,
)
from lightning_meta.training.config import NotConfigurable, to_config
from lightning_meta.training.inner_loop import check_step_count
from lightning_meta.training.meta_batch import MetaBatch, MetaBatchRunner
from lightning_meta.training.metrics import TASK_KEY, EpisodeStatistics, control_figures, task_ids
from lightning_meta.training.plots import curve_figure, curve_points, save_curve

_EVAL_STAGES = ("val", "test")
#: The most adaptation steps ``eval_curve`` may ask for: each is a forward and backward on every
#: evaluation episode, at every validation.
MAX_EVAL_CURVE_STEPS = 1000
#: Hyper-parameters of earlier versions, by their name today: ``task_by_task: bool`` became ``meta_batch``.
_RENAMED = {"task_by_task": ("meta_batch", {True: "task_by_task", False: "all_at_once"})}

#: Modules moved when the core was grouped into sub-packages (0.1.0 → today): old checkpoints name
#: their classes (``class_path``) by the old module.
MOVED_MODULES = {
    "lightning_meta.tasks": "lightning_meta.data.tasks",
    "lightning_meta.tables": "lightning_meta.data.tables",
    "lightning_meta.corpus": "lightning_meta.data.corpus",
    "lightning_meta.tokenization": "lightning_meta.data.tokenization",
    "lightning_meta.local_files": "lightning_meta.data.local_files",
    "lightning_meta.datamodules.base": "lightning_meta.data.episodic",
    "lightning_meta.stream": "lightning_meta.data.stream",
    "lightning_meta.language_models": "lightning_meta.learners.language_models",
    "lightning_meta.encoders": "lightning_meta.learners.encoders",
    "lightning_meta.models": "lightning_meta.learners.models",
    "lightning_meta.algorithms.base": "lightning_meta.training.algorithm",
    "lightning_meta.module": "lightning_meta.training.module",
    "lightning_meta.scaling": "lightning_meta.training.scaling",
    "lightning_meta.checkpoints": "lightning_meta.training.checkpoints",
    "lightning_meta.metrics": "lightning_meta.training.metrics",
    "lightning_meta.plots": "lightning_meta.training.plots",
    "lightning_meta.progress": "lightning_meta.training.progress",
    "lightning_meta.config": "lightning_meta.training.config",
    "lightning_meta.export": "lightning_meta.handoff.export",
    "lightning_meta.pretraining": "lightning_meta.handoff.pretraining",
    "lightning_meta.task_gym": "lightning_meta.datamodules.task_gym",
    "lightning_meta.task_collections": "lightning_meta.datamodules.task_collections",
}


def current_class_path(class_path: str) -> str:
    """``class_path`` under today's module layout (unchanged unless its module moved)."""
    module, _, name = class_path.rpartition(".")
    return f"{MOVED_MODULES.get(module, module)}.{name}" if module else class_path


def _current_class_paths(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: current_class_path(item)
            if key in ("class_path", "_class_path") and isinstance(item, str)
            else _current_class_paths(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_current_class_paths(item) for item in value]
    return value


class MetaLearningModule(LightningModule):
    """Meta-trains ``learner`` with ``algorithm``; evaluates by adapting on fixed episodes.

    Args:
        learner: the model and its loss (e.g. ``RegressionLearner(MLP())``).
        algorithm: a :class:`MetaAlgorithm`; ``MAML()`` when omitted.
        optimizer: the meta-optimizer, called with the trainable parameters
            (LightningCLI: ``--optimizer`` style ``class_path``/``init_args``).
        lr_scheduler: optional scheduler, called with the optimizer; stepped every step.
        eval_inner_steps: adaptation steps at validation/test/predict; overrides the algorithm's.
        algorithm_lr: learning rate of the algorithm's own meta-parameters (learned inner learning
            rates), in their own optimizer parameter group; ``None``: the optimizer's.
        meta_batch: how the tasks of a meta-batch run, all with the same meta-gradient:
            ``"vmap"`` (in parallel, fastest for small models), ``"task_by_task"`` (memory flat in
            the meta-batch size), ``"all_at_once"`` (every task's graph kept until one backward),
            or ``"auto"``: vmap where it is exact and pays, else task by task, with the reason
            logged (see :meth:`MetaAlgorithm.meta_loss`). FSDP and ``16-mixed`` always run all at once.
            Evaluation follows it: where it resolves to vmap (``"auto"``: checked on the first
            evaluation batch), the episodes of an evaluation batch adapt in one vmapped trajectory.
        eval_curve: adaptation curve: step counts (0 = before adaptation), e.g. ``[0, 1, 5, 10]``,
            at which validation/test also log the query figures, all read off one adaptation
            trajectory per episode (``algorithm.adapt_steps``), at most :data:`MAX_EVAL_CURVE_STEPS`;
            ``None``: only before and after. SIGTERM stops evaluation between adaptation steps.

    Logs ``train/query_loss`` on the steps Lightning logs (``log_every_n_steps``) and, for validation
    and test, ``{stage}/query_loss_pre`` and ``{stage}/query_loss_post`` (plus ``_acc_`` for
    classification), each with a ``_ci95`` half-width over episodes, or over tasks where episodes share
    their ``metadata["task"]`` (:class:`~lightning_meta.training.metrics.EpisodeStatistics`); with
    ``eval_curve``, also ``{stage}/query_loss_step{k}`` (and ``query_acc_step{k}``) for each listed
    ``k``, with ``_ci95``.
    ``test`` also writes these figures to ``results.json`` in the run's log folder (when the trainer
    has a logger). Adaptation works in ``validate``/``test``/``predict`` under Lightning's default
    ``inference_mode``.

    Data are checked once per batch (finite values, token ids, labels; one host sync) and the
    meta-loss once per step; a non-finite meta-loss stops training with an error that says
    whether the meta-parameters or the inner loop diverged. On SIGTERM or Ctrl-C during ``fit``
    a resumable checkpoint is saved (:class:`~lightning_meta.training.checkpoints.PreemptionCheckpoint`).
    """

    def __init__(
        self,
        learner: Learner,
        algorithm: MetaAlgorithm | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        eval_inner_steps: int | None = None,
        meta_batch: MetaBatch = "auto",
        algorithm_lr: float | None = None,
        eval_curve: list[int] | None = None,
    ) -> None:
        super().__init__()
        # Built here, not as a default instance: jsonargparse would carry a default instance's
        # init args over to a different class chosen on the command line.
        if algorithm is None:  # the default implementation lives a layer above: import it when needed
            from lightning_meta.algorithms import MAML

            algorithm = MAML()
        check_step_count("eval_inner_steps", eval_inner_steps, default="the algorithm's")
        #: Runs the meta-batches and evaluation batches as ``meta_batch`` says, keeping the ``"auto"`` verdicts.
        self.runner = MetaBatchRunner(meta_batch)
        _check_eval_curve(eval_curve, algorithm)
        self.learner = learner
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.eval_inner_steps = eval_inner_steps
        self.meta_batch = meta_batch
        self.algorithm_lr = algorithm_lr
        self.eval_curve = eval_curve
        #: the curve's step counts, ascending and distinct
        self._curve_steps = sorted(set(eval_curve or []))
        algorithm.bind(learner)  # its meta-parameters exist before the optimizer and any checkpoint load
        #: fast weights kept replicated under FSDP, whose gradients this module averages over ranks.
        self._replicated: list[nn.Parameter] = []
        #: parameters the step's meta-gradient does not reach, tied into the loss for DDP only.
        self._unreached: tuple[Tensor, ...] = ()
        #: frozen weights kept in bf16 while a bf16-mixed trainer runs, with their own dtypes.
        self._frozen_dtypes: dict[str, torch.dtype] = {}
        #: the training step of the checkpoint loaded last (Lightning restores no step for test/validate).
        self._checkpoint_step: int | None = None
        #: when this process's training and the current evaluation started (``time.perf_counter``).
        self._started: dict[str, float] = {}
        #: the adaptation-curve PNG written by the last test (``None`` before, or without matplotlib).
        self.curve_path: Path | None = None
        #: that PNG's figure (``AdaptationCurvePlot`` adds it to TensorBoard).
        self.curve_figure: Any = None
        algorithm.check_learner(learner)
        fingerprint_rebuilt_weights(learner)  # as built: the trainer may cast it to another precision
        self._save_hyperparameters(algorithm)
        self.episode_stats = nn.ModuleDict(
            {
                f"{stage}_{name}_{when}": EpisodeStatistics()
                for stage in _EVAL_STAGES
                for name in learner.metric_names
                for when in ("pre", "post")
            }
            | {
                f"{stage}_{name}_step{step}": EpisodeStatistics()
                for stage in _EVAL_STAGES
                for name in learner.metric_names
                for step in self._curve_steps
            }
            | {  # control tasks' figures (metrics.control_figures), counted only where episodes carry a ceiling
                f"{stage}_{name}": EpisodeStatistics()
                for stage in _EVAL_STAGES
                for name in (
                    "ceiling",
                    "chance",
                    "control_gap_pre",
                    "control_gap_post",
                    *(f"control_gap_step{step}" for step in self._curve_steps),
                )
            }  # fmt: skip
        )

    def _save_hyperparameters(self, algorithm: MetaAlgorithm) -> None:
        if cli_hyperparameters() is not None:  # LightningCLI hands over the config it parsed
            self.save_hyperparameters()
            return
        try:
            hparams = {
                "learner": to_config(self.learner),
                "algorithm": to_config(algorithm),
                "optimizer": to_config(self.optimizer),
                "lr_scheduler": to_config(self.lr_scheduler),
                "eval_inner_steps": self.eval_inner_steps,
                "meta_batch": self.meta_batch,
                "algorithm_lr": self.algorithm_lr,
                "eval_curve": self.eval_curve,
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

    def setup(self, stage: str) -> None:
        """Refuse, before any step, a strategy or precision that cannot run this algorithm exactly."""
        scaling.check_precision(self.trainer.precision, self.algorithm)
        if message := scaling.slow_bf16_message(self.trainer.precision, self.device.type):
            rank_zero_warn(message)
        scaling.check_strategy(self.trainer.strategy, self.learner, self.algorithm)
        datamodule = getattr(self.trainer, "datamodule", None)
        for setting in ("max_length", "block_size"):
            length = getattr(datamodule, setting, None)
            if isinstance(length, int):
                check_sequence_length(length, self.learner.max_positions, setting, f"lower --data.init_args.{setting}")
        # A frozen base in bf16 under bf16-mixed (scaling.keep_frozen_linear_weights_in): one process, unsharded.
        if self.trainer.precision == "bf16-mixed" and self.trainer.world_size == 1 and not self._frozen_dtypes:
            self._frozen_dtypes = scaling.keep_frozen_linear_weights_in(self.learner, torch.bfloat16)

    def teardown(self, stage: str) -> None:
        """Give a frozen base kept in bf16 its own dtype back: outside autocast its layers need it (the values
        stay bf16-rounded; checkpoints and exports hold the learner's dtype)."""
        scaling.restore_dtypes(self.learner, self._frozen_dtypes)
        self._frozen_dtypes = {}

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``): shard the model except its fast weights."""
        if self.device_mesh is None or self._replicated or _is_sharded(self.learner):
            return
        mesh = self.device_mesh["data_parallel"]
        self._replicated = scaling.shard(self.learner, self.algorithm, mesh, self.sharding_units())
        self._replicated += list(self.algorithm.parameters())  # not part of the sharded model

    def sharding_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each gathered only while it runs); override to change
        the wrapping policy. By default the transformer blocks (the model's longest ``nn.ModuleList``)."""
        return scaling.default_units(self.learner.model)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if _is_sharded(self.learner):
            scaling.reshard(self.learner.model)
            scaling.average_gradients(self._replicated, self.device_mesh["data_parallel"].get_group())
        for parameter in self._unreached:  # no gradient, as on one device: weight decay leaves them alone
            parameter.grad = None
        self._unreached = ()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping; under FSDP2 one global norm over sharded and replicated gradients.

        There the backbone's gradients are DTensors and the replicated fast weights' (and the
        algorithm's own parameters') plain tensors, which one ``clip_grad_norm_`` cannot mix.
        """
        if not _is_sharded(self.learner):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not gradient_clip_val:
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        by_value = GradClipAlgorithmType(gradient_clip_algorithm or "norm") == GradClipAlgorithmType.VALUE
        scaling.clip_gradients(parameters, float(gradient_clip_val), by_value=by_value)

    def configure_optimizers(self) -> Any:
        learner = [p for p in self.learner.parameters() if p.requires_grad]
        owned = [p for p in self.algorithm.parameters() if p.requires_grad]
        if self.algorithm_lr is not None and owned:
            optimizer = self.optimizer([{"params": learner}, {"params": owned, "lr": self.algorithm_lr}])
        else:
            optimizer = self.optimizer(learner + owned)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        # autograd.grad cannot reach FSDP-sharded weights, and float16 needs Lightning's loss scaling.
        sharded_or_scaled = self.device_mesh is not None or self.trainer.precision.startswith("16")
        # Lightning writes a step's logs every log_every_n_steps steps: query figures that cost extra only then.
        every = self.trainer.log_every_n_steps
        out = self.algorithm.meta_loss(
            self.learner, batch, meta_batch=MetaBatchRunner("all_at_once") if sharded_or_scaled else self.runner,
            outer_step=self.global_step, report_query=every > 0 and (self.global_step + 1) % every == 0,
        )  # fmt: skip
        if not torch.isfinite(out.loss):  # the step's one host sync besides the data check
            raise FloatingPointError(
                f"The meta-loss is {out.loss.item()} at step {self.global_step}: {self._diagnose_divergence(batch)} "
                "Checkpoints already saved are untouched."
            )
        metrics = dict(out.metrics)
        padding = batch.padding_fraction()  # of the splits the model ran; MetaICL reports its own sequences'
        if padding is not None:
            metrics.setdefault("padding_fraction", padding)
        for name, value in metrics.items():  # the bar shows the losses; the logs get everything
            self.log(f"train/{name}", value, batch_size=len(batch), prog_bar=name != "padding_fraction")
        if out.unreached and isinstance(self.trainer.strategy, DDPStrategy):
            # DDP expects a gradient for every parameter: tie the unreached ones in with weight zero; their
            # zero gradients are dropped again before the optimizer step.
            self._unreached = out.unreached
            return out.loss + torch.stack([p.sum() for p in out.unreached]).sum() * 0
        return out.loss

    def _diagnose_divergence(self, batch: TaskBatch) -> str:
        """Which side diverged: the meta-parameters (outputs before adaptation) or the inner loop."""
        parameters_finite = all(bool(torch.isfinite(p).all()) for p in self.learner.parameters())
        with torch.no_grad():
            outputs_finite = parameters_finite and all(
                bool(torch.isfinite(self.learner.predict(episode.support)).all()) for episode in batch.episodes()
            )
        if not outputs_finite:
            return (
                "the meta-parameters diverged (the model's outputs are not finite even before adaptation). Lower "
                "the meta learning rate (--model.optimizer.init_args.lr), enable gradient clipping "
                "(--trainer.gradient_clip_val=1.0), or resume from an earlier checkpoint."
            )
        inner_lr = getattr(self.algorithm, "inner_lr", None)
        if inner_lr is None:
            return f"the model is finite before adaptation, so {type(self.algorithm).__name__}'s loss diverged."
        return (
            f"the model is finite before adaptation, so the inner loop diverged: lower inner_lr (now {inner_lr}) "
            "or inner_steps (--model.algorithm.init_args.inner_lr=...)."
        )

    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: TaskBatch, batch_idx: int, dataloader_idx: int = 0) -> list[Tensor]:
        """Query outputs after adapting to each episode's support (logits for ProtoNet)."""
        self.algorithm.check_data(self.learner, batch)
        padding = bool(batch.metadata.get(PADDING_KEY))
        with torch.inference_mode(False):
            batch = batch.detached_clone()
            steps = self.eval_inner_steps
            outputs = [self.algorithm.predict(self.learner, episode, steps) for episode in batch.episodes()]
        return [] if padding else outputs  # a padding batch runs only to join the other ranks' collectives

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        # Lightning evaluates under inference_mode; the inner loop needs autograd and ordinary
        # (non-inference) tensors, so leave inference mode and copy the batch.
        self.algorithm.check_data(self.learner, batch)
        with torch.inference_mode(False):
            batch = batch.detached_clone()
            if self.algorithm.adapts_weights:
                # Along the trajectory (it stops between inner steps on SIGTERM), all the episodes in one vmapped
                # trajectory where the meta_batch mode resolves to vmap (never over sharded weights).
                runner = MetaBatchRunner("task_by_task") if self.device_mesh is not None else self.runner
                figures = runner.evaluate(
                    self.algorithm, self.learner, batch,
                    lambda episode, parallel: self._evaluate_along_curve(
                        self.learner, episode, self.eval_inner_steps, parallel=parallel
                    ),
                )  # fmt: skip
            else:  # scored episode by episode (MetaICL's options: a host sync per episode)
                episodes = [self.algorithm.evaluate(self.learner, episode, self.eval_inner_steps)
                            for episode in batch.episodes()]  # fmt: skip
                figures = {key: torch.stack([episode[key] for episode in episodes]) for key in episodes[0]}
        if batch.metadata.get(PADDING_KEY):
            return  # evaluated only to join the other ranks' collectives (FSDP); its figures are not counted
        figures |= control_figures(figures, batch.metadata)
        if not bool(torch.stack([torch.isfinite(values).all() for values in figures.values()]).all()):
            raise FloatingPointError(self._describe_bad_evaluation(figures, stage))
        tasks = task_ids(batch.metadata[TASK_KEY]) if TASK_KEY in batch.metadata else None
        for key, values in figures.items():
            for episode, value in enumerate(values):
                self.episode_stats[f"{stage}_{key}"].update(value, None if tasks is None else tasks[episode])

    def _evaluate_along_curve(
        self, learner: Learner, episode: Episode, steps: int | None, *, parallel: bool = False
    ) -> dict[str, Tensor]:
        """:meth:`MetaAlgorithm.evaluate`'s figures plus ``{name}_step{k}`` for each ``eval_curve`` step count.

        Everything comes from one trajectory: the ``*_post`` figures are those at the evaluation
        steps, so they equal ``evaluate``'s. ``parallel``: the episodes of the batch run together
        under ``torch.func.vmap``.
        """
        self.algorithm.check_learner(learner)
        post_steps = self.algorithm.evaluation_steps() if steps is None else steps
        wanted = {post_steps, *self._curve_steps}
        rule = None if parallel else generation_rule(episode.metadata)  # vmap cannot decode
        before = learner.evaluation_metrics(episode.query, parallel=parallel, generation=rule)
        figures_at = {0: before}
        trajectory = self.algorithm.adapt_steps(learner, episode.support, max(wanted), parallel=parallel)
        for step, adapted in enumerate(trajectory, start=1):
            # Lightning checks the signal only between batches, and one batch may adapt for minutes.
            if (trainer := attached_trainer(self)) is not None and trainer.received_sigterm:
                raise SIGTERMException
            if step in wanted:
                figures_at[step] = learner.evaluation_metrics(episode.query, adapted, parallel=parallel,
                                                              generation=rule)  # fmt: skip
        figures = {f"{name}_pre": value for name, value in before.items()}
        figures |= {f"{name}_post": value for name, value in figures_at[post_steps].items()}
        return figures | {
            f"{name}_step{step}": value for step in self._curve_steps for name, value in figures_at[step].items()
        }

    def _describe_bad_evaluation(self, figures: dict[str, Tensor], stage: str) -> str:
        before = torch.isfinite(figures["loss_pre"]) if "loss_pre" in figures else torch.ones((), dtype=torch.bool)
        if not bool(before.all()):
            episode = int(torch.nonzero(~before)[0])
            return (
                f"{stage}: the query loss before adaptation is not finite on episode {episode} of the batch: the "
                "meta-parameters diverged. Resume from an earlier checkpoint with a lower meta learning rate."
            )
        # The earliest adapted figure that is not finite names the episode (curve points come in step order).
        adapted = [f"loss_step{step}" for step in self._curve_steps if step > 0] + ["loss_post"]
        finite = {key: torch.isfinite(figures[key]) for key in adapted if key in figures}
        diverged = next((key for key, values in finite.items() if not bool(values.all())), None)
        episode = int(torch.nonzero(~finite[diverged])[0]) if diverged else 0
        step = int(diverged.removeprefix("loss_step")) if diverged and diverged.startswith("loss_step") else None
        when = "after" if step is None else f"after {step} step{'s' * (step != 1)}"
        return (
            f"{stage}: adaptation diverged on episode {episode} of the batch (the query loss is finite before "
            f"adaptation, not {when}). Lower the evaluation step size (--model.algorithm.init_args.eval_inner_lr) "
            "or the evaluation steps (--model.eval_inner_steps)."
        )

    def configure_callbacks(self) -> list[Callback]:
        """A resumable checkpoint on SIGTERM or Ctrl-C during fit, unless checkpointing is off or the
        trainer has one already (the user's, or this module's from ``fit`` when ``test`` follows):
        returning it again would make Lightning announce that it overrides the trainer's."""
        trainer = attached_trainer(self)
        if trainer is not None and (
            not trainer.checkpoint_callbacks
            or any(isinstance(callback, PreemptionCheckpoint) for callback in trainer.callbacks)
        ):
            return []
        return [PreemptionCheckpoint()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the tokenizer, and leave out the frozen weights the learner rebuilds from its pretrained model
        (not under FSDP2, whose strategy loads the state itself, before :meth:`on_load_checkpoint`)."""
        tokenizer = getattr(self.learner, "tokenizer", None)
        if isinstance(tokenizer, str):
            checkpoint["lightning_meta"] = {"tokenizer": tokenizer, "tokenizer_fingerprint": fingerprint_of(tokenizer)}
        state = checkpoint.get("state_dict", {})
        for name, dtype in self._frozen_dtypes.items():  # a frozen base kept in bf16: saved in its own dtype
            if LEARNER_PREFIX + name in state:
                state[LEARNER_PREFIX + name] = state[LEARNER_PREFIX + name].to(dtype)
        if self.device_mesh is None:
            leave_out_rebuilt_weights(checkpoint, self.learner, LEARNER_PREFIX)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = checkpoint.get("global_step")
        saved = checkpoint.get("lightning_meta", {})
        tokenizer = getattr(self.learner, "tokenizer", None)
        if isinstance(tokenizer, str) and "tokenizer_fingerprint" in saved:
            check_tokenizer(saved["tokenizer"], saved["tokenizer_fingerprint"], tokenizer, "The checkpoint's learner")
        if "state_dict" in checkpoint:  # a sharded checkpoint's weights were loaded by the strategy (never left out)
            restore_rebuilt_weights(checkpoint["state_dict"], saved, self.learner, LEARNER_PREFIX)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> MetaLearningModule:
        """Lightning's ``load_from_checkpoint``, for local files only and with ``weights_only=True``.

        A URL, a truncated file or a file that is not a checkpoint is refused with a message that
        names the file; components are rebuilt from the saved hyper-parameters. A checkpoint whose
        learner's pretrained model runs its own code (``trust_remote_code``) is refused unless the
        caller sets ``trust_remote_code=True``: the file never decides that. A slim checkpoint's
        pretrained model named by a relative path is looked up where it was found at training.
        """
        if isinstance(checkpoint_path, str | Path):
            checkpoint = load_checkpoint_file(checkpoint_path)  # memory-mapped: checks without reading the weights
            source = f"The checkpoint {checkpoint_path}"
        else:  # a file object: read here, so that its hyper-parameters are checked like a file's
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            source = "The checkpoint"
        saved = dict(checkpoint.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {})
        if not trust_remote_code:  # what the caller passes (learner=...) is the caller's, not the file's
            asked = take_out_remote_code({key: value for key, value in saved.items() if key not in kwargs})[1]
            refuse_remote_code(asked, source, "MetaLearningModule.load_from_checkpoint(..., trust_remote_code=True)")
        hparams = upgrade_hyperparameters(saved, str(checkpoint_path)) if _needs_upgrade(saved) else saved
        base = rebuilt_base(checkpoint)
        if base is not None and isinstance(hparams.get("learner"), Mapping) and "learner" not in kwargs:
            hparams["learner"] = dict(hparams["learner"])
            hparams["learner"]["init_args"] = dict(hparams["learner"].get("init_args") or {}) | {"pretrained": base}
        if hparams is not saved or base is not None or not isinstance(checkpoint_path, str | Path):
            checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = hparams
            checkpoint_path = io.BytesIO()
            torch.save(checkpoint, checkpoint_path)
            checkpoint_path.seek(0)
        return super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict, weights_only=True,
            **kwargs,
        )  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        self._log_episode_stats("val")

    def on_test_epoch_end(self) -> None:
        self._log_episode_stats("test")

    def on_train_start(self) -> None:
        self._started["fit"] = time.perf_counter()

    def on_train_end(self) -> None:
        self._started["fit_seconds"] = time.perf_counter() - self._started.get("fit", time.perf_counter())

    def on_test_start(self) -> None:
        self._started["test"] = time.perf_counter()

    def _log_episode_stats(self, stage: str) -> None:
        summary = []
        figures: dict[str, dict[str, float | int]] = {}
        for key, statistic in self.episode_stats.items():
            if not key.startswith(f"{stage}_") or statistic.update_count == 0:
                continue
            mean, ci95, episodes, tasks = statistic.compute()
            name = f"{stage}/query_{key.removeprefix(f'{stage}_')}"
            self.log(name, mean.float(), sync_dist=False)
            self.log(f"{name}_ci95", ci95.float(), sync_dist=False)
            figures[name] = {"mean": mean.item(), "ci95": ci95.item(), "episodes": episodes}
            if tasks is not None:
                figures[name]["tasks"] = tasks
            counted = f"{episodes} episodes" + (f", {tasks} task{'s' * (tasks != 1)}" if tasks is not None else "")
            summary.append(f"{name} = {mean.item():.4f} ± {ci95.item():.4f} ({counted})")
            statistic.reset()
        if summary and stage == "test" and not self.trainer.sanity_checking:
            heading = "Post-adaptation results (mean ± 95% CI over episodes, or over tasks where episodes share them):"
            rank_zero_info(heading + "\n  " + "\n  ".join(summary))
            if self.trainer.loggers:
                self._write_results(stage, figures)

    def _write_results(self, stage: str, figures: dict[str, dict[str, float | int]]) -> None:
        """The printed results as ``results.json`` in the run's log folder, for scripts.

        ``figures``: ``{name: {mean, ci95, episodes}}``; ``curve``: ``{figure: [{steps, mean, ci95}]}``
        from the ``eval_curve`` figures.
        """
        folder = Path(self.trainer.log_dir)  # on every rank: log_dir is a collective call
        if not self.trainer.is_global_zero:
            return
        flat = {name: values["mean"] for name, values in figures.items()}
        flat |= {f"{name}_ci95": values["ci95"] for name, values in figures.items()}
        curve = {
            name: [{"steps": step, "mean": mean, "ci95": ci95} for step, (mean, ci95) in sorted(points.items())]
            for name, points in curve_points(flat, stage).items()
        }
        steps = self.trained_steps
        results = {"stage": stage, **self._run_description(folder), "global_step": steps, "figures": figures,
                   "curve": curve}  # fmt: skip
        if curve:
            results["curve_png"] = self._write_curve(flat, stage, folder, steps, figures)
        path = folder / "results.json"
        text = json.dumps(results, indent=2, default=str) + "\n"
        # Atomic: a full disk leaves no empty results.json (nor replaces an earlier one), and says so.
        write_file_atomically(path, lambda partial: partial.write_text(text), "the results file",
                              "; the figures printed above are what it would hold")  # fmt: skip
        rank_zero_info(f"Saved the results to {path}")

    @property
    def trained_steps(self) -> int:
        """Optimizer steps the evaluated weights were trained for: this run's, or the loaded checkpoint's (after
        ``test --ckpt_path``, where Lightning restores the weights but leaves ``global_step`` at 0)."""
        return max(self.global_step, self._checkpoint_step or 0)

    def _run_description(self, folder: Path) -> dict[str, Any]:
        """What ran, for ``results.json``: the algorithm and its options, the learner and data, the config, seed,
        checkpoint, times and versions."""
        import lightning
        import transformers

        from lightning_meta.version import VERSION

        def described(component: Any) -> Any:
            try:
                return to_config(component)
            except NotConfigurable:
                return {"class_path": f"{type(component).__module__}.{type(component).__qualname__}"}

        datamodule = getattr(self.trainer, "datamodule", None)
        config = folder / "config.yaml"
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by Lightning's seed_everything (and the CLI's seed_everything)
        now = time.perf_counter()
        return {
            "algorithm": described(self.algorithm),
            "learner": type(self.learner).__name__,
            "data": None if datamodule is None else {"class_path": type(datamodule).__name__,
                                                     "init_args": dict(getattr(datamodule, "hparams", {}))},
            "config": str(config) if config.is_file() else None,
            "seed": None if seed is None else int(seed),
            "checkpoint": None if self.trainer.ckpt_path is None else str(self.trainer.ckpt_path),
            "time": {
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "training_seconds": round(self._started["fit_seconds"], 1) if "fit_seconds" in self._started else None,
                "evaluation_seconds": round(now - self._started["test"], 1) if "test" in self._started else None,
            },
            "versions": {"lightning_meta": VERSION, "torch": torch.__version__, "lightning": lightning.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
        }  # fmt: skip

    def _write_curve(
        self, flat: dict[str, float], stage: str, folder: Path, steps: int, figures: dict[str, dict[str, float | int]]
    ) -> str | None:
        """The adaptation curve as ``{stage}_adaptation_curve.png``, titled with what it shows; its file name
        (``None`` without matplotlib, which draws it)."""
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            rank_zero_info("The adaptation curve is in results.json; pip install matplotlib to have it drawn too.")
            return None
        datamodule = getattr(self.trainer, "datamodule", None)
        shots = dict(getattr(datamodule, "hparams", {})).get("shots")
        episodes = max(int(values["episodes"]) for values in figures.values())
        title = ", ".join(part for part in (
            type(self.algorithm).__name__, None if shots is None else f"K = {shots} shots",
            f"{steps} steps trained", f"{episodes} {stage} episodes") if part)  # fmt: skip
        self.curve_figure = curve_figure(flat, stage, title=title)
        self.curve_path = save_curve(self.curve_figure, stage, folder)
        return self.curve_path.name


def upgrade_hyperparameters(hparams: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``hparams`` saved by an earlier version, with renamed options under today's names (a one-line notice each)."""
    upgraded = _current_class_paths(dict(hparams))
    for old, (new, values) in _RENAMED.items():
        if old in upgraded:
            value = upgraded.pop(old)
            upgraded.setdefault(new, values.get(value, value))
            rank_zero_info(
                f"{source}: {old}={value!r} (an earlier version's option) is read as {new}={upgraded[new]!r}."
            )
    return upgraded


def _needs_upgrade(hparams: Mapping[str, Any]) -> bool:
    """Whether ``hparams`` use an earlier version's option names or module paths (:func:`upgrade_hyperparameters`)."""
    return bool(_RENAMED.keys() & set(hparams)) or _current_class_paths(dict(hparams)) != dict(hparams)


def _check_eval_curve(eval_curve: list[int] | None, algorithm: MetaAlgorithm) -> None:
    if eval_curve is None:
        return
    if not eval_curve or any(isinstance(step, bool) or not isinstance(step, int) or step < 0 for step in eval_curve):
        raise ValueError(
            f"eval_curve must be a non-empty list of step counts >= 0 (0 = before adaptation), got {eval_curve!r}; "
            "e.g. --model.eval_curve=[0,1,5,10], or leave it unset."
        )
    if max(eval_curve) > MAX_EVAL_CURVE_STEPS:
        raise ValueError(
            f"eval_curve={eval_curve!r} asks for {max(eval_curve)} adaptation steps per evaluation episode, more "
            f"than {MAX_EVAL_CURVE_STEPS} (each is a forward and backward on every episode, at every validation): "
            "list step counts up to that, e.g. --model.eval_curve=[0,1,5,10]."
        )
    if not algorithm.adapts_weights:
        raise ValueError(
            f"eval_curve={eval_curve!r} needs an algorithm that adapts weights; {type(algorithm).__name__} has no "
            "adaptation steps. Leave eval_curve unset."
        )


def _is_sharded(learner: Learner) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(learner.model, FSDPModule)
