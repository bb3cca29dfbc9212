"""The hand-off: a lightning-meta checkpoint as a Hugging Face ``save_pretrained`` folder.

``export(ckpt_path, output_dir)`` writes safetensors weights with no wrapper prefixes,
``config.json``, the tokenizer, ``generation_config.json`` and ``meta_learning.json`` (where the
weights come from: algorithm and options, fast weights, steps, final validation metrics, source
checkpoint and its sha256, tokenizer fingerprint). ``AutoModelForCausalLM.from_pretrained`` then
gives the logits the learner in the checkpoint gives. It reads single-file checkpoints of
:class:`~lightning_meta.MetaLearningModule` (causal-LM learners) and of
:class:`~lightning_meta.handoff.pretraining.CausalLMPretraining`, and sharded checkpoint folders
(``ModelParallelStrategy``/FSDP2 and ``FSDPStrategy`` layouts), consolidated with torch's
``dcp_to_torch_save``. :class:`ExportCallback` writes the same folder at the end of ``fit``, under DDP and FSDP too.

The folder is written next to its destination and renamed into place, so an existing export is
never left half-replaced. Reading the model a checkpoint holds is :mod:`~lightning_meta.handoff.checkpoint_models`;
writing the folder, :mod:`~lightning_meta.handoff.export_folder`.
"""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.handoff.checkpoint_models import model_from_checkpoint, read_checkpoint
from lightning_meta.handoff.export_folder import (
    ADAPTER_FILE,
    PROVENANCE_FILE,
    check_writable,
    read_provenance,
    refuse_existing,
    write_export,
)
from lightning_meta.training.checkpoints import check_local_checkpoint_path

#: Importable from here as before the reading and the writing moved to their own modules.
__all__ = [
    "PROVENANCE_FILE",
    "ExportCallback",
    "export",
    "model_from_checkpoint",
    "read_checkpoint",
    "read_provenance",
    "write_export",
]


def export(
    ckpt_path: str,
    output_dir: str,
    overwrite: bool = False,
    adapter_dir: str | None = None,
    tokenizer: str | None = None,
    pretrained: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Export a lightning-meta checkpoint as a Hugging Face folder (``lightning-meta export``).

    Args:
        ckpt_path: a ``.ckpt`` file written by ``lightning-meta fit`` or ``pretrain``, or a sharded
            checkpoint folder (FSDP / ``ModelParallelStrategy``).
        output_dir: the folder to write; refused if it exists, unless ``overwrite``.
        overwrite: replace an earlier export at ``output_dir`` (a folder holding ``meta_learning.json``),
            only once the new folder is complete; any other existing path is refused.
        adapter_dir: with LoRA, also write the adapters alone here (peft's format); the main folder
            always holds the merged weights.
        tokenizer: the tokenizer folder to ship, when the one the checkpoint names is not on this machine;
            it must give the same token ids (checked against the checkpoint's fingerprint).
        pretrained: the pretrained model to rebuild the frozen weights from, for a checkpoint that leaves them
            out (LoRA on a pretrained model), when the one it names is not on this machine; it must hold the
            same weights (checked against the checkpoint's fingerprint).
        trust_remote_code: let the checkpoint's pretrained model folder run its own Python code (``auto_map``
            in its config.json), when the checkpoint was trained with it; never taken from the checkpoint.
    """
    output = Path(output_dir).expanduser()
    source_path = check_local_checkpoint_path(ckpt_path)
    folders = [(output, PROVENANCE_FILE)] + ([(Path(adapter_dir).expanduser(), ADAPTER_FILE)] if adapter_dir else [])
    for folder, marker in folders:
        refuse_existing(folder, overwrite, source_path, marker)
        check_writable(folder)
    checkpoint, source = read_checkpoint(ckpt_path)
    model, provenance = model_from_checkpoint(
        checkpoint,
        tokenizer=tokenizer,
        adapter_dir=adapter_dir,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
    )
    provenance.update(source)
    write_export(model, provenance, output, overwrite=overwrite)
    rank_zero_info(f"Exported {ckpt_path} to {output} (AutoModelForCausalLM.from_pretrained('{output}')).")
    return output


class ExportCallback(Callback):
    """Export the model as a Hugging Face folder at the end of ``fit`` (and at each best validation).

    Works single-process, under DDP and under FSDP2: the full state dict is gathered on every rank
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; ``save_pretrained`` on a
    sharded model crashes), then rank 0 writes and the others wait.

    Args:
        output_dir: where the final export goes; by default ``export`` in the run's log folder
            (``lightning_logs/version_N/export``).
        best_dir: also export here each time ``monitor`` improves at validation.
        monitor: the logged validation figure that decides "best".
        mode: ``min`` or ``max``: which direction of ``monitor`` is better.
        overwrite: replace an ``output_dir``/``best_dir`` another run wrote.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        best_dir: str | None = None,
        monitor: str = "val/query_loss_post",
        mode: str = "min",
        overwrite: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.output_dir = output_dir
        self.best_dir = best_dir
        self.monitor = monitor
        self.mode = mode
        self.overwrite = overwrite
        self._best: float | None = None
        self._written: set[Path] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path(trainer.log_dir or trainer.default_root_dir) / "export")
        if stage == "fit" and trainer.is_global_zero:  # fail before training, not after it
            for folder in filter(None, (self.output_dir, self.best_dir)):
                refuse_existing(Path(folder).expanduser(), self.overwrite)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.best_dir is None or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._best is None or (value < self._best if self.mode == "min" else value > self._best):
            self._best = value
            self.export(trainer, pl_module, Path(self.best_dir).expanduser())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, Path(self.output_dir).expanduser())

    def export(self, trainer: Trainer, pl_module: LightningModule, output: Path) -> None:
        """Gather the full weights on every rank; rank 0 writes ``output``."""
        state = _full_state_dict(pl_module)
        if trainer.is_global_zero:
            checkpoint = {
                "state_dict": state,
                "hyper_parameters": dict(pl_module.hparams),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
            }
            pl_module.on_save_checkpoint(checkpoint)  # the tokenizer and, for pretraining, the model config
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            # The run's own options, which built the learner this run trains: trusted as the run trusts them.
            model, provenance = model_from_checkpoint(checkpoint, trust_remote_code=True)
            provenance |= {"validation": metrics, "source_checkpoint": None, "exported_during": "fit"}
            write_export(model, provenance, output, overwrite=self.overwrite or output in self._written)
            self._written.add(output)
            rank_zero_info(f"Exported the model at step {trainer.global_step} to {output}.")
        trainer.strategy.barrier("lightning_meta_export")


def _full_state_dict(module: LightningModule) -> dict[str, Tensor]:
    """Every weight in full, on the CPU, on every rank (FSDP2 shards gathered)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
