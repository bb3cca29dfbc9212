"""One node of a two-node DDP run (one CPU process per node, gloo), launched by torchrun from test_multinode.py.

``torchrun --nnodes=2 --nproc-per-node=1 --node-rank=N ... tests/workers/multinode_worker.py OUT`` trains each case
of :data:`CASES` (the cases and data of ``distributed_worker.py``) for its ``STEPS`` steps through
``Trainer(num_nodes=2, devices=1, strategy="ddp")``, then validates; rank 0 writes the weights and the
validation figures to ``OUT/<case>.pt``, in the format ``test_distributed.py`` compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from distributed_worker import STEPS, build

#: Second-order MAML on a classifier's head, and on a tiny GPT-2's LoRA adapters.
CASES = ("maml_head", "maml_lora")


def run(out: Path) -> None:
    torch.set_num_threads(1)
    for case in CASES:
        module, datamodule, _ = build(case)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            num_nodes=2,
            strategy="ddp",
            max_steps=STEPS,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule)
        trainer.validate(module, datamodule, verbose=False)
        figures = {name: value.item() for name, value in trainer.callback_metrics.items()}
        if trainer.global_rank == 0:
            weights = {name: value.detach().clone() for name, value in module.learner.state_dict().items()}
            torch.save(
                {
                    "weights": weights,
                    "figures": figures,
                    "num_nodes": trainer.num_nodes,
                    "world_size": trainer.world_size,
                },
                out / f"{case}.pt",
            )


if __name__ == "__main__":
    run(Path(sys.argv[1]))
    # gloo's threads must stop before the interpreter exits, or it can abort ("terminate called without an
    # active exception", exit -6) after the run has finished.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
