"""Writing checkpoints during a run: atomically, and once more when a scheduler preempts it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_meta.data.local_files import remove_stale_partials, write_file_atomically

#: Exit status after SIGTERM, as a shell reports a process the signal ended: schedulers read it as "not done".
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM


class PreemptionCheckpoint(OnExceptionCheckpoint):
    """On SIGTERM (how schedulers preempt jobs) or Ctrl-C during ``fit``: save a resumable checkpoint.

    The checkpoint goes to ``last-preempted.ckpt`` beside the run's other checkpoints; resumed
    from it (``--ckpt_path``), training continues with exactly the batches and weights the
    uninterrupted run would have had (Lightning stops at a step boundary). Every checkpoint of the
    run is written atomically (:class:`AtomicCheckpointIO`). After SIGTERM in any stage
    (``fit``, ``validate``, ``test``, ``predict``) the process exits with status 143 instead of
    Lightning's 0, so a scheduler does not record the run as finished. Under SLURM
    with Lightning's auto-requeue the job is also requeued (Lightning's own handler).

    Args:
        dirpath: where to write; by default the ``ModelCheckpoint`` folder, else the trainer's
            ``default_root_dir``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last-preempted") -> None:
        super().__init__(dirpath or ".", filename)
        self.dirpath_given = dirpath

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checkpoints of this run are written atomically (:class:`AtomicCheckpointIO`), unless the strategy or
        the user chose another writer than Lightning's default."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the partial files that a killed save left beside the checkpoint this run resumes from (the
        checkpoint is loaded by now: ``trainer.ckpt_path`` is set only then)."""
        resumed_from = trainer.ckpt_path
        if trainer.is_global_zero and resumed_from and "://" not in str(resumed_from):
            remove_stale_partials(Path(resumed_from).expanduser().parent)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            # Lightning exits with SystemExit(None), i.e. status 0, in every stage: a scheduler would record
            # an interrupted test (which prints no results) as a success.
            exception.code = SIGTERM_EXIT_CODE
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        self.dirpath = self.dirpath_given or _checkpoint_folder(trainer)
        trainer.save_checkpoint(self.ckpt_path)
        reason = "SIGTERM" if isinstance(exception, SIGTERMException) else "Interrupted"
        rank_zero_info(
            f"{reason} at step {trainer.global_step}: saved a resumable checkpoint to {self.ckpt_path}. Resume with "
            f"the same command plus --ckpt_path {self.ckpt_path}"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Keep the file: unlike the base class, never delete a checkpoint a user may resume from."""


def _checkpoint_folder(trainer: pl.Trainer) -> str:
    folders = [callback.dirpath for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    return str(folders[0]) if folders and folders[0] else str(trainer.default_root_dir)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a checkpoint appears under its name only once it is complete.

    Each local checkpoint is written as a hidden ``.NAME.partial-PID-HOST`` file beside its destination and
    renamed into place (:func:`~lightning_meta.data.local_files.write_file_atomically`), so a full disk or
    a killed process never leaves a truncated file under a name that looks valid (an earlier checkpoint of
    that name is kept). A full disk is said in one line; the partial file of a save that SIGKILL stopped
    is removed by the next save into that folder, or when a run resumes from a checkpoint there.
    :class:`PreemptionCheckpoint` (which the package's modules add) sets it on the trainer unless the
    strategy or the user brings another writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_file_atomically(
            Path(path),
            lambda partial: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, partial, storage_options),
            "the checkpoint",
            ", or give a folder on another disk (--trainer.default_root_dir), then resume from the last checkpoint "
            "(--ckpt_path)",
        )
