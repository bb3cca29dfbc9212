"""Pretraining on a LitData corpus under DDP on two CPU processes (gloo), run by test_litdata_text.py.

``python tests/workers/litdata_worker.py CORPUS OUT`` trains for 6 steps, saving a checkpoint at step 3, then
resumes from it; each rank writes the token blocks of every step of both runs to ``OUT/{full,resumed}-rankR.json``.
Lightning's launcher re-runs this script for rank 1, hence the ``__main__`` guard.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "handoff"))
from test_export import TINY  # noqa: E402

from lightning_meta.datamodules import LitDataTextDataModule  # noqa: E402
from lightning_meta.handoff.pretraining import CausalLMPretraining  # noqa: E402


class RecordBatches(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.batches = path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = batch["input_ids"].tolist()

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(f"{self.path}-rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


def run(corpus: str, out: Path, name: str, ckpt_path: Path | None = None) -> None:
    L.seed_everything(0, verbose=False)
    module = CausalLMPretraining(model_config=dict(TINY), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    data = LitDataTextDataModule(corpus, tokenizer="embedded-bpe-4096", block_size=16, batch_size=4, seed=3)
    every = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=out,
        callbacks=[RecordBatches(out / name), every],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)


if __name__ == "__main__":
    corpus, out = sys.argv[1], Path(sys.argv[2])
    run(corpus, out, "full")
    run(corpus, out, "resumed", out / "ckpt" / "step=3.ckpt")
