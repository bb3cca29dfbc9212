"""Speed of a meta-step: this library against a plain ``torch.func`` loop and the cost floor.

Workloads (issue 12):

- **W1** sinusoid: MLP 1-40-40-1, meta-batch 25 tasks, K = 10 support + 10 query, 5 inner SGD steps.
- **W2** tiny GPT-2: 2 layers, width 128, 4 heads, vocabulary 2048, dropout 0; meta-batch 4 tasks
  of 4 support + 4 query sequences of 64 tokens (random token ids), 2 inner SGD steps. ProtoNet
  runs on a text episode instead: 5 ways, 4 shots + 4 queries of 64 tokens, the same GPT-2 body
  mean-pooled as the embedding.

Algorithms: second-order MAML, FOMAML, Reptile (and ProtoNet on W2); Adam outer step everywhere.
Implementations, each with its own copy of the same initial model and its own Adam:

- ``library``: the public API, what ``MetaLearningModule.training_step`` does: ``meta_loss`` with
  the default ``meta_batch="auto"``, the finite-loss check, ``backward``, Adam. Reptile runs with
  ``report_query=False``, as the host sets it on the steps it does not log.
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
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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

from lightning_meta import MLP, CausalLMLearner, ClassificationLearner, RegressionLearner, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, MetaAlgorithm, ProtoNet, Reptile
from lightning_meta.learners import Learner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "n_positions": 64,
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # fmt: skip
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
        batches.append(TaskBatch(support={"x": x[:, :shots], "y": y[:, :shots]},
                                 query={"x": x[:, shots:], "y": y[:, shots:]}))  # fmt: skip
    return batches


def token_batches(count: int, meta_batch_size: int = 4, shots: int = 4, queries: int = 4) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, _GPT2["vocab_size"], (meta_batch_size, shots + queries, 64), generator=generator)
        mask = torch.ones_like(ids)
        batches.append(TaskBatch(support={"input_ids": ids[:, :shots], "attention_mask": mask[:, :shots]},
                                 query={"input_ids": ids[:, shots:], "attention_mask": mask[:, shots:]}))  # fmt: skip
    return batches


def text_episode_batches(count: int, meta_batch_size: int = 4, ways: int = 5, shots: int = 4) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(shots).expand(meta_batch_size, -1)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, _GPT2["vocab_size"], (meta_batch_size, 2 * ways * shots, 64), generator=generator)
        batches.append(TaskBatch(support={"x": ids[:, : ways * shots], "y": labels},
                                 query={"x": ids[:, ways * shots :], "y": labels}, ways=ways, shots=shots))  # fmt: skip
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
    algorithm.report_query = False  # as the host sets it on the steps it does not log
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
            weights = {name: w - inner_lr * (gradients[name].detach() if first_order else gradients[name])
                       for name, w in weights.items()}  # fmt: skip
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
    algorithm.report_query = False
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
    return ({name: statistics.median(values) for name, values in cpu.items()},
            {name: statistics.median(values) for name, values in wall.items()})  # fmt: skip


def peak_memory(workload: str, implementation: str) -> float:
    """MiB above the resident set before one second-order MAML step (after a warm-up step)."""
    case = setup(workload, "maml", 2)
    run = implementations(case)[implementation]()
    run(case.batches[0])
    return common.peak_rss_mib(lambda: run(case.batches[1]))


def memory_table(workloads: list[str]) -> dict[tuple[str, str], float]:
    peaks = {}
    environment = common.MALLOC_ENV | {"OMP_NUM_THREADS": "1"}
    for workload in workloads:
        case = setup(workload, "maml", 1)
        for name in implementations(case):
            command = [sys.executable, __file__, "--memory-one", workload, name]
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
            peaks[workload, name] = json.loads(output.strip().splitlines()[-1])
    return peaks


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: W1 and W2 FOMAML, 1+3 steps, no memory")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per implementation (>= 20 for results)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--algorithms", nargs="+", default=None, help="default: all of each workload's")
    parser.add_argument("--no-memory", action="store_true", help="skip the second-order peak-memory processes")
    parser.add_argument("--pass-costs", action="store_true", help="only W2's cost per forward/backward pass by shape")
    parser.add_argument("--memory-one", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    torch.set_num_threads(1)
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
        print(f"| {workload} | {algorithm} | {ratio['library']}{extra} | {ratio['plain-loop']} | "
              f"{1e3 * medians['floor']:.1f} | {speedup:.2f}x faster | {difference:.0e} |")  # fmt: skip
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
