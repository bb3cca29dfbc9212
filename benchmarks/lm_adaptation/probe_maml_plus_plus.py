"""Which part of MAML++ hurts on the LM benchmark? 80 outer steps of each variant, same data and LoRA learner.

Prints the training query loss (after the last inner step) at outer steps 20, 40, 60 and 80:

    OMP_NUM_THREADS=1 python benchmarks/lm_adaptation/probe_maml_plus_plus.py maml2 mpp_lslr mpp_msl   # ~4 min
    OMP_NUM_THREADS=1 python benchmarks/lm_adaptation/probe_maml_plus_plus.py --steps 4 maml2         # smoke run
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_meta import MetaLearningModule
from lightning_meta.algorithms import MAML, MAMLPlusPlus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py, tiny_lm.py
import common  # noqa: E402
import tiny_lm  # noqa: E402  (this benchmark's data and learner)

VARIANTS = {
    "maml2": lambda: MAML(inner_lr=0.3, inner_steps=2),
    "mpp_lslr": lambda: MAMLPlusPlus(inner_lr=0.3, inner_steps=2, learn_inner_lrs=True, multi_step_loss=False),
    "mpp_msl": lambda: MAMLPlusPlus(
        inner_lr=0.3, inner_steps=2, learn_inner_lrs=False, multi_step_loss=True, msl_anneal_steps=100
    ),
}


class _Print(L.Callback):
    def __init__(self, name: str, every: int) -> None:
        self.name = name
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            print(self.name, trainer.global_step, round(float(trainer.callback_metrics["train/query_loss"]), 3))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=80, help="outer steps per variant (the loss is printed 4 times)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in args.variants:
        data = tiny_lm.make_datamodule(0, batches_per_epoch=200)
        L.seed_everything(0, verbose=False)
        module = MetaLearningModule(tiny_lm.lora_learner(), VARIANTS[name](), optimizer=tiny_lm.adamw())
        trainer = common.benchmark_trainer(args.steps, callbacks=[_Print(name, max(1, args.steps // 4))])
        trainer.fit(module, data)


if __name__ == "__main__":
    main()
