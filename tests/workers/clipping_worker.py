"""Two CPU processes (gloo) for test_gradient_clipping.py: ``python tests/workers/clipping_worker.py {fsdp,ddp} OUT``.

``fsdp``: each case of :data:`FSDP_CASES` trained with ``gradient_clip_val`` under FSDP2 (sharded backbone
gradients are DTensors, the replicated fast weights' plain tensors). ``ddp``: Reptile on a subset of the
weights with AdamW's weight decay (the backbone gets no meta-gradient). Rank 0 writes the full weights to
``OUT/<case>.pt``. Lightning's launcher re-runs this script for rank 1, hence the ``__main__`` guard.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

from lightning_meta import MetaLearningModule  # noqa: E402

CLIP = 0.05  # well below the meta-gradients' norm, so every step clips
FSDP_CASES = ("fomaml_head", "maml_lora")
DDP_CASE = "reptile_last_block"
ADAMW = functools.partial(torch.optim.AdamW, lr=0.05, weight_decay=0.5)


def ddp_module() -> tuple[MetaLearningModule, object]:
    make_learner, make_algorithm, make_data = worker.CASES[DDP_CASE]
    torch.manual_seed(0)
    return MetaLearningModule(make_learner(), make_algorithm(), optimizer=ADAMW), make_data()


def run(strategy_name: str, out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    for case in FSDP_CASES if strategy_name == "fsdp" else (DDP_CASE,):
        if strategy_name == "fsdp":
            module, datamodule, _ = worker.build(case)
            strategy, clip = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), CLIP
        else:
            (module, datamodule), strategy, clip = ddp_module(), "ddp", None
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            max_steps=worker.STEPS,
            gradient_clip_val=clip,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule)
        weights = get_model_state_dict(module.learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.global_rank == 0:
            torch.save(weights, out / f"{case}.pt")


if __name__ == "__main__":
    run(sys.argv[1], Path(sys.argv[2]))
    # gloo's threads must stop before the interpreter exits, or it can abort ("terminate called without an
    # active exception", exit -6) after the run has finished.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
