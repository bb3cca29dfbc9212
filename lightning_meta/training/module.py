"""The host LightningModule: any algorithm, any learner, Lightning's training machinery."""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import torch
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from torch import Tensor, nn

from lightning_meta._compat import attached_trainer, cli_hyperparameters
from lightning_meta.data.tasks import PADDING_KEY, TaskBatch
from lightning_meta.data.tokenization import check_data_tokenizer
from lightning_meta.learners.base import Learner, check_sequence_length
from lightning_meta.training import scaling
from lightning_meta.training.algorithm import MetaAlgorithm
from lightning_meta.training.checkpoint_loading import loadable_checkpoint
from lightning_meta.training.checkpoints import fingerprint_rebuilt_weights, read_module_state, write_module_state
from lightning_meta.training.config import NotConfigurable, to_config
from lightning_meta.training.evaluation import (
    along_curve,
    check_eval_curve,
    describe_bad_evaluation,
    diagnose_divergence,
)
from lightning_meta.training.inner_loop import check_step_count
from lightning_meta.training.meta_batch import MetaBatchMode, MetaBatchRunner
from lightning_meta.training.metrics import TASK_KEY, control_metrics, task_ids
from lightning_meta.training.preemption import PreemptionCheckpoint
from lightning_meta.training.results import episode_statistics, log_episode_statistics

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
            at which validation/test also log the query metrics, all read off one adaptation
            trajectory per episode (``algorithm.adapt_steps``), at most :data:`MAX_EVAL_CURVE_STEPS`;
            ``None``: only before and after. SIGTERM stops evaluation between adaptation steps.

    Logs ``train/query_loss`` on the steps Lightning logs (``log_every_n_steps``) and, for validation
    and test, ``{stage}/query_loss_pre`` and ``{stage}/query_loss_post`` (plus ``_accuracy_`` for
    classification), each with a ``_ci95`` half-width over episodes, or over tasks where episodes share
    their ``metadata["task"]`` (:class:`~lightning_meta.training.metrics.EpisodeStatistics`); with
    ``eval_curve``, also ``{stage}/query_loss_step{k}`` (and ``query_accuracy_step{k}``) for each listed
    ``k``, with ``_ci95``.
    ``test`` also writes these metrics to ``results.json`` in the run's log folder (when the trainer
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
        meta_batch: MetaBatchMode = "auto",
        algorithm_lr: float | None = None,
        eval_curve: list[int] | None = None,
    ) -> None:
        super().__init__()
        # Built here, not as a default instance: jsonargparse would carry a default instance's
        # init args over to a different class chosen on the command line.
        if algorithm is None:  # the default implementation lives a layer above: import it when needed
            from lightning_meta.algorithms import MAML

            algorithm = MAML()
        _check_components(learner, algorithm)
        check_step_count("eval_inner_steps", eval_inner_steps, default="the algorithm's")
        #: Runs the meta-batches and evaluation batches as ``meta_batch`` says, keeping the ``"auto"`` verdicts.
        self.runner = MetaBatchRunner(meta_batch)
        check_eval_curve(eval_curve, algorithm)
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
        self.timings: dict[str, float] = {}
        #: the adaptation-curve PNG written by the last test (``None`` before, or without matplotlib).
        self.curve_path: Path | None = None
        #: that PNG's figure (``AdaptationCurvePlot`` adds it to TensorBoard).
        self.curve_figure: Any = None
        algorithm.check_learner(learner)
        fingerprint_rebuilt_weights(learner)  # as built: the trainer may cast it to another precision
        self._save_hyperparameters(algorithm)
        #: per-episode metrics of validation and test, by ``{stage}_{name}_{pre|post|step<k>}``, until logged
        self.episode_stats = episode_statistics(_EVAL_STAGES, learner.metric_names, self._curve_steps)

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
        model_tokenizer, data_tokenizer = (
            getattr(self.learner, "tokenizer", None),
            getattr(datamodule, "tokenizer", None),
        )
        if isinstance(model_tokenizer, str) and isinstance(data_tokenizer, str):
            check_data_tokenizer(model_tokenizer, data_tokenizer)
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
        # Lightning writes a step's logs every log_every_n_steps steps: query metrics that cost extra only then.
        every = self.trainer.log_every_n_steps
        out = self.algorithm.meta_loss(
            self.learner,
            batch,
            meta_batch=self._runner_for(evaluation=False),
            outer_step=self.global_step,
            report_query=every > 0 and (self.global_step + 1) % every == 0,
        )
        if not torch.isfinite(out.loss):  # the step's one host sync besides the data check
            cause = diagnose_divergence(self.algorithm, self.learner, batch)
            raise FloatingPointError(
                f"The meta-loss is {out.loss.item()} at step {self.global_step}: {cause} "
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

    def _runner_for(self, *, evaluation: bool) -> MetaBatchRunner:
        """This module's runner, or one of the mode the strategy or precision requires (``scaling``)."""
        precision = self.trainer.precision if attached_trainer(self) is not None else ""
        required = scaling.required_meta_batch_mode(self.device_mesh is not None, precision, evaluation=evaluation)
        return self.runner if required is None else MetaBatchRunner(required)

    def _sigterm_received(self) -> bool:
        # Lightning checks the signal only between batches, and one batch may adapt for minutes.
        trainer = attached_trainer(self)
        return trainer is not None and trainer.received_sigterm

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        # Lightning evaluates under inference_mode; the inner loop needs autograd and ordinary
        # (non-inference) tensors, so leave inference mode and copy the batch.
        self.algorithm.check_data(self.learner, batch)
        with torch.inference_mode(False):
            batch = batch.detached_clone()
            if self.algorithm.adapts_weights:
                # Along the trajectory (it stops between inner steps on SIGTERM), all the episodes in one vmapped
                # trajectory where the meta_batch mode resolves to vmap (never over sharded weights).
                runner = self._runner_for(evaluation=True)
                metrics = runner.evaluate(
                    self.algorithm,
                    self.learner,
                    batch,
                    lambda episode, parallel: along_curve(
                        self.algorithm,
                        self.learner,
                        episode,
                        self.eval_inner_steps,
                        self._curve_steps,
                        parallel=parallel,
                        stop_requested=self._sigterm_received,
                    ),
                )
            else:  # scored episode by episode (MetaICL's options: a host sync per episode)
                episodes = [
                    self.algorithm.evaluate(self.learner, episode, self.eval_inner_steps)
                    for episode in batch.episodes()
                ]
                metrics = {key: torch.stack([episode[key] for episode in episodes]) for key in episodes[0]}
        if batch.metadata.get(PADDING_KEY):
            return  # evaluated only to join the other ranks' collectives (FSDP); its metrics are not counted
        metrics |= control_metrics(metrics, batch.metadata)
        if not bool(torch.stack([torch.isfinite(values).all() for values in metrics.values()]).all()):
            raise FloatingPointError(describe_bad_evaluation(metrics, stage, self._curve_steps, self.algorithm))
        tasks = task_ids(batch.metadata[TASK_KEY]) if TASK_KEY in batch.metadata else None
        for key, values in metrics.items():
            for episode, value in enumerate(values):
                self.episode_stats[f"{stage}_{key}"].update(value, None if tasks is None else tasks[episode])

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
        (:func:`~lightning_meta.training.checkpoints.write_module_state`)."""
        write_module_state(checkpoint, self.learner, self._frozen_dtypes, sharded=self.device_mesh is not None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = checkpoint.get("global_step")
        read_module_state(checkpoint, self.learner)

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
        allow = "MetaLearningModule.load_from_checkpoint(..., trust_remote_code=True)"
        loadable = loadable_checkpoint(checkpoint_path, given=kwargs, trust_remote_code=trust_remote_code, allow=allow)
        return super().load_from_checkpoint(
            loadable,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **kwargs,
        )

    def on_validation_epoch_end(self) -> None:
        log_episode_statistics(self, "val")

    def on_test_epoch_end(self) -> None:
        log_episode_statistics(self, "test")

    def on_train_start(self) -> None:
        self.timings["fit"] = time.perf_counter()

    def on_train_end(self) -> None:
        self.timings["fit_seconds"] = time.perf_counter() - self.timings.get("fit", time.perf_counter())

    def on_test_start(self) -> None:
        self.timings["test"] = time.perf_counter()

    @property
    def trained_steps(self) -> int:
        """Optimizer steps the evaluated weights were trained for: this run's, or the loaded checkpoint's (after
        ``test --ckpt_path``, where Lightning restores the weights but leaves ``global_step`` at 0)."""
        return max(self.global_step, self._checkpoint_step or 0)


def _is_sharded(learner: Learner) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(learner.model, FSDPModule)


def _check_components(learner: object, algorithm: object) -> None:
    """Refuses a learner or an algorithm of the wrong kind by name, with the call that makes one."""
    if not isinstance(learner, Learner):
        fix = (
            "wrap the model in a learner: RegressionLearner(model), ClassificationLearner(model), "
            "EncoderLearner(...) or CausalLMLearner(...)"
            if isinstance(learner, nn.Module)
            else "give a Learner (RegressionLearner(model), CausalLMLearner(...), ...)"
        )
        raise TypeError(f"MetaLearningModule's learner is a {type(learner).__name__}, not a Learner: {fix}.")
    if not isinstance(algorithm, MetaAlgorithm):
        if isinstance(algorithm, str):
            fix = f"lightning_meta.algorithms.get({algorithm!r}, inner_lr=...) builds one by name"
        elif isinstance(algorithm, type):
            fix = f"call the class with its options: {algorithm.__name__}(...)"
        else:
            fix = "give one such as MAML(inner_lr=0.01)"
        raise TypeError(f"MetaLearningModule's algorithm is {algorithm!r}, not a MetaAlgorithm instance: {fix}.")
