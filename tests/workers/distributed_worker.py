"""Meta-training and evaluation under DDP or FSDP2 on two CPU processes (gloo), run by test_distributed.py.

``python tests/workers/distributed_worker.py {ddp,fsdp} OUT`` trains every case of :data:`CASES` for
:data:`STEPS` steps, then validates, and rank 0 writes the full (unsharded) weights and the
validation figures to ``OUT/<case>.pt``; ``fsdp-resume OUT`` checks a sharded checkpoint's
resume (:func:`resume`). Lightning's launcher for these strategies re-runs this
script for rank 1, hence the ``__main__`` guard. The cases and the data are defined here so that
the test computes the single-process reference from exactly the same objects.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightning_meta import CausalLMLearner, ClassificationLearner, Episode, LoraSettings, MetaLearningModule
from lightning_meta.algorithms import FOMAML, MAML, MetaAlgorithm, MetaSGD, ProtoNet, Reptile
from lightning_meta.datamodules import EpisodicDataModule, LanguageModelingTasksDataModule

STEPS = 3
LR = 0.1
TOKENIZER = "embedded-bpe-512"


class Blocks(nn.Module):
    """An embedding, a list of blocks (what FSDP shards), and a head."""

    def __init__(self, features: int = 8, width: int = 16, ways: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.head = nn.Linear(width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


class Clusters(EpisodicDataModule):
    """3-way 2-shot episodes of Gaussian clusters with random centres."""

    def __init__(self, ways: int = 3, shots: int = 2, queries: int = 2, features: int = 8) -> None:
        super().__init__(
            meta_batch_size=2, batches_per_epoch=20, num_val_tasks=6, num_test_tasks=6, eval_meta_batch_size=2
        )
        self.ways, self.shots, self.queries, self.features = ways, shots, queries, features

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        per_class = self.shots + self.queries
        centres = 2 * torch.randn(self.ways, 1, self.features, generator=generator)
        points = centres + torch.randn(self.ways, per_class, self.features, generator=generator)
        labels = torch.arange(self.ways).view(-1, 1).expand(-1, per_class)
        return Episode(
            support={"x": points[:, : self.shots].reshape(-1, self.features), "y": labels[:, : self.shots].reshape(-1)},
            query={"x": points[:, self.shots :].reshape(-1, self.features), "y": labels[:, self.shots :].reshape(-1)},
            ways=self.ways,
            shots=self.shots,
        )


def lm_data() -> LanguageModelingTasksDataModule:
    return LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=16,
        shots=2,
        queries=2,
        meta_batch_size=2,
        num_val_tasks=4,
        num_test_tasks=2,
        eval_meta_batch_size=2,
        max_tokens_per_domain=2000,
    )


def lm_learner() -> CausalLMLearner:
    config = {
        "model_type": "gpt2",
        "n_layer": 2,
        "n_embd": 16,
        "n_head": 2,
        "n_positions": 32,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    return CausalLMLearner(
        model_config=config,
        tokenizer=TOKENIZER,
        lora=LoraSettings(r=2, alpha=4),
        meta_learn_base=True,
        attn_implementation="eager",
    )


#: name -> (learner factory, algorithm factory, datamodule factory)
CASES = {
    "maml_all": (lambda: ClassificationLearner(Blocks()), lambda: MAML(inner_lr=0.5, inner_steps=2), Clusters),
    "maml_head": (lambda: ClassificationLearner(Blocks(), "head"), lambda: MAML(inner_lr=0.5, inner_steps=2), Clusters),
    "maml_last_block": (
        lambda: ClassificationLearner(Blocks(), "last_blocks:1"),
        lambda: MAML(inner_lr=0.5, inner_steps=2),
        Clusters,
    ),
    "fomaml_head": (
        lambda: ClassificationLearner(Blocks(), "head"),
        lambda: FOMAML(inner_lr=0.5, inner_steps=2),
        Clusters,
    ),
    "reptile_last_block": (
        lambda: ClassificationLearner(Blocks(), ["blocks.1.*", "head"]),
        lambda: Reptile(inner_lr=0.5, inner_steps=2),
        Clusters,
    ),
    "fomaml_all": (lambda: ClassificationLearner(Blocks()), lambda: FOMAML(inner_lr=0.5, inner_steps=2), Clusters),
    "reptile_all": (lambda: ClassificationLearner(Blocks()), lambda: Reptile(inner_lr=0.5, inner_steps=2), Clusters),
    "protonet": (lambda: ClassificationLearner(Blocks()), ProtoNet, Clusters),
    "metasgd_head": (
        lambda: ClassificationLearner(Blocks(), "head"),
        lambda: MetaSGD(inner_lr=0.3, inner_steps=2),
        Clusters,
    ),
    "maml_lora": (lm_learner, lambda: MAML(inner_lr=0.5, inner_steps=1), lm_data),
}
#: Cases FSDP refuses at setup: every weight is a fast weight (see lightning_meta.training.scaling).
DDP_ONLY = {"maml_all", "fomaml_all", "reptile_all"}


def build(case: str) -> tuple[MetaLearningModule, EpisodicDataModule, MetaAlgorithm]:
    """The case's module (same initial weights in every process) and datamodule."""
    make_learner, make_algorithm, make_data = CASES[case]
    torch.manual_seed(0)
    learner = make_learner()
    module = MetaLearningModule(learner, make_algorithm(), optimizer=functools.partial(torch.optim.SGD, lr=LR))
    return module, make_data(), module.algorithm


def run(strategy_name: str, out: Path) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    for case in CASES:
        if strategy_name == "fsdp" and case in DDP_ONLY:
            continue
        module, datamodule, _ = build(case)
        strategy = (
            ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy_name == "fsdp" else "ddp"
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
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
        weights = get_model_state_dict(module.learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        owned = {name: value.detach().clone() for name, value in module.algorithm.state_dict().items()}
        if trainer.global_rank == 0:
            torch.save({"weights": weights, "figures": figures, "algorithm": owned}, out / f"{case}.pt")


def resume(out: Path) -> None:
    """FSDP2: 4 steps straight, and 2 steps + a sharded checkpoint + 2 resumed steps; rank 0 saves both."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    torch.set_num_threads(1)
    results = {}
    for name, steps, ckpt_path in (("straight", 4, None), ("first", 2, None), ("resumed", 4, out / "step2.ckpt")):
        module, datamodule, _ = build("fomaml_head")
        checkpoint = ModelCheckpoint(dirpath=out, filename="step2", every_n_train_steps=2, save_top_k=1)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            max_steps=steps,
            num_sanity_val_steps=0,
            logger=False,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            callbacks=[checkpoint] if name == "first" else [],
            enable_checkpointing=name == "first",
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule, ckpt_path=ckpt_path)
        results[name] = get_model_state_dict(
            module.learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if trainer.global_rank == 0:
        torch.save(results, out / "resume.pt")


if __name__ == "__main__":
    if sys.argv[1] == "fsdp-resume":
        resume(Path(sys.argv[2]))
    else:
        run(sys.argv[1], Path(sys.argv[2]))
    # gloo's threads must stop before the interpreter exits, or it can abort ("terminate called without an
    # active exception", exit -6) after the run has finished.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
