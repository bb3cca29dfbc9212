"""The tiny GPT-2 domain-adaptation set-up that ``lm_adaptation``, its MAML++ probe and ``handoff`` share.

The quick start's tiny GPT-2 (2 layers, width 128, random init, ``embedded-bpe-4096`` tokenizer),
LM tasks from the embedded standard-library corpus (4 support + 4 query blocks of 64 tokens,
meta-batch 4), the methods compared (learner, algorithm, meta-optimizer, block passes per task) and
the held-out adaptation curve: query loss before and after 1, 5 and 10 SGD steps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import common
import torch
from torch import Tensor

from lightning_meta import CausalLMLearner, Learner, LoraSettings, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, MAMLPlusPlus, MetaAlgorithm, MetaSGD, MultiTask, Reptile
from lightning_meta.datamodules import LanguageModelingTasksDataModule

MODEL_CONFIG = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 128,
    "n_head": 4,
    "n_positions": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
TOKENIZER = "embedded-bpe-4096"
BLOCK_SIZE = 64
SHOTS = 4
QUERIES = 4
META_BATCH_SIZE = 4
NUM_VAL_TASKS = 16
NUM_TEST_TASKS = 64
EVAL_DATA_SEED = 0  # the validation and test episodes stay the same whatever the training seed is
EVAL_STEPS = (1, 5, 10)
# Evaluation SGD step sizes tried on the validation domains, per method family.
ALL_WEIGHTS_GRID = (0.03, 0.1, 0.3)
LORA_GRID = (0.1, 0.3, 1.0)
META_LR = 5e-3


@dataclass
class Method:
    """One row of the table: how to build its learner, algorithm and meta-optimizer."""

    name: str
    make_learner: Callable[[], CausalLMLearner]
    make_algorithm: Callable[[], MetaAlgorithm]
    optimizer: Callable[..., torch.optim.Optimizer]
    passes_per_task: int  # block forward/backward passes per task per outer step
    grid: tuple[float, ...]


def all_weights_learner() -> CausalLMLearner:
    """The tiny GPT-2 with every weight fast."""
    return CausalLMLearner(model_config=dict(MODEL_CONFIG), tokenizer=TOKENIZER)


def lora_learner() -> CausalLMLearner:
    """The tiny GPT-2 with LoRA adapters (r 8, alpha 16) as fast weights; base weights meta-learned too."""
    return CausalLMLearner(
        model_config=dict(MODEL_CONFIG),
        tokenizer=TOKENIZER,
        lora=LoraSettings(r=8, alpha=16),
        fast_weights="lora",
        meta_learn_base=True,
    )


def adamw(lr: float = META_LR) -> Callable[..., torch.optim.Optimizer]:
    """AdamW(lr, weight decay 0.01): the quick start's meta-optimizer (there with lr 2e-3)."""
    return functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01)


FOMAML_INNER = (0.1, 2)  # (inner_lr, inner_steps)
REPTILE_INNER = (0.1, 4)
MAML_LORA_INNER = (0.3, 1)
#: The "step size" of methods that adapt with their own learned rates (Meta-SGD, MAML++).
LEARNED = 0.0


def step_size_label(step_size: float) -> str:
    """``learned`` or the step size."""
    return "learned" if step_size == LEARNED else f"{step_size:g}"


METHODS = {
    "fomaml": Method(
        f"FOMAML (all weights, {FOMAML_INNER[1]} inner steps)",
        all_weights_learner,
        lambda: FOMAML(inner_lr=FOMAML_INNER[0], inner_steps=FOMAML_INNER[1]),
        adamw(),
        SHOTS * FOMAML_INNER[1] + QUERIES,
        ALL_WEIGHTS_GRID,
    ),
    "reptile": Method(
        f"Reptile (all weights, {REPTILE_INNER[1]} inner steps)",
        all_weights_learner,
        lambda: Reptile(inner_lr=REPTILE_INNER[0], inner_steps=REPTILE_INNER[1]),
        adamw(),
        SHOTS * REPTILE_INNER[1],
        ALL_WEIGHTS_GRID,
    ),
    "maml_lora": Method(
        f"MAML 2nd order (LoRA fast, {MAML_LORA_INNER[1]} inner step{'s' * (MAML_LORA_INNER[1] > 1)})",
        lora_learner,
        lambda: MAML(inner_lr=MAML_LORA_INNER[0], inner_steps=MAML_LORA_INNER[1]),
        adamw(),
        SHOTS * MAML_LORA_INNER[1] + QUERIES,
        LORA_GRID,
    ),
    "metasgd_lora": Method(
        f"Meta-SGD (LoRA fast, {MAML_LORA_INNER[1]} inner step, learned rates)",
        lora_learner,
        lambda: MetaSGD(inner_lr=MAML_LORA_INNER[0], inner_steps=MAML_LORA_INNER[1]),
        adamw(),
        SHOTS * MAML_LORA_INNER[1] + QUERIES,
        (LEARNED,),
    ),
    "mamlpp_lora": Method(
        "MAML++ (LoRA fast, 2 inner steps: LSLR, MSL, DA)",
        lora_learner,
        lambda: MAMLPlusPlus(inner_lr=MAML_LORA_INNER[0], inner_steps=2, msl_anneal_steps=100, first_order_steps=50),
        adamw(),
        (SHOTS + QUERIES) * 2,  # every inner step's support pass and, for the multi-step loss, its query pass
        (LEARNED,),
    ),
    "baseline": Method(
        "Baseline: multi-domain LM training",
        all_weights_learner,
        lambda: MultiTask(inner_lr=0.1),
        adamw(),
        SHOTS + QUERIES,
        ALL_WEIGHTS_GRID,
    ),
}


def make_datamodule(seed: int, batches_per_epoch: int = 100) -> LanguageModelingTasksDataModule:
    """The quick start's LM tasks: 4 support + 4 query blocks of 64 tokens, meta-batch 4."""
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=BLOCK_SIZE,
        shots=SHOTS,
        queries=QUERIES,
        meta_batch_size=META_BATCH_SIZE,
        batches_per_epoch=batches_per_epoch,
        num_val_tasks=NUM_VAL_TASKS,
        num_test_tasks=NUM_TEST_TASKS,
        seed=seed,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def adaptation_curve(
    learner: Learner, batches: Sequence[TaskBatch], step_size: float, algorithm: MetaAlgorithm | None = None
) -> dict[int, Tensor]:
    """Per-episode query loss before adaptation (key 0) and after each of ``EVAL_STEPS`` SGD steps of ``step_size``.

    ``step_size=LEARNED``: the trained ``algorithm``'s own rule (Meta-SGD's and MAML++'s learned rates).
    """
    rule = algorithm if step_size == LEARNED else FOMAML(inner_lr=step_size)
    return common.adaptation_curve(learner, rule, batches, EVAL_STEPS)
