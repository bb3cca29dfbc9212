"""Which part of MAML++ hurts on the LM benchmark? 80 outer steps of each variant, same data and LoRA learner.

Prints the training query loss (after the last inner step) at outer steps 20, 40, 60 and 80:

    OMP_NUM_THREADS=1 python benchmarks/lm_adaptation/probe_maml_plus_plus.py maml2 mpp_lslr mpp_msl   # ~4 min
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (this benchmark's data and learner)

from lightning_meta import MetaLearningModule  # noqa: E402
from lightning_meta.algorithms import MAML, MAMLPlusPlus  # noqa: E402

VARIANTS = {
    "maml2": lambda: MAML(inner_lr=0.3, inner_steps=2),
    "mpp_lslr": lambda: MAMLPlusPlus(inner_lr=0.3, inner_steps=2, learn_inner_lrs=True, multi_step_loss=False),
    "mpp_msl": lambda: MAMLPlusPlus(inner_lr=0.3, inner_steps=2, learn_inner_lrs=False, multi_step_loss=True,
                                    msl_anneal_steps=100),
}  # fmt: skip


class _Print(L.Callback):
    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step % 20 == 0:
            print(self.name, trainer.global_step, round(float(trainer.callback_metrics["train/query_loss"]), 3))


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for name in names:
        data = run.make_datamodule(0, batches_per_epoch=200)
        L.seed_everything(0, verbose=False)
        module = MetaLearningModule(run.lora_learner(), VARIANTS[name](), optimizer=run.adamw())
        trainer = L.Trainer(max_steps=80, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[_Print(name)])  # fmt: skip
        trainer.fit(module, data)


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
