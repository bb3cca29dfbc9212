"""Meta-learning past one device: which strategy and precision can run which algorithm, and FSDP2 sharding.

The rule for FSDP: ``torch.func.functional_call`` silently *ignores* replacement values for
FSDP-sharded parameters (the forward uses the sharded module's own weights), and
``torch.autograd.grad`` cannot reach them. So under FSDP2 (Lightning's
``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``) the learner's model is
sharded *except* its fast weights, which stay replicated on every rank: the inner loop adapts
them functionally as on one device, the sharded backbone is only differentiated through, FSDP
reduce-scatters the backbone's meta-gradient, and the replicated fast weights' meta-gradients
are averaged over the ranks here. Algorithms without an inner loop (ProtoNet) shard everything.

Everything a strategy or precision cannot run is refused in ``setup``, before any step, with
the supported alternative named. See the README's support matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_meta._compat import cpu_has_native_bf16, set_data_parallel_degree
from lightning_meta.learners.base import Learner
from lightning_meta.learners.fast_weights import blocks_of
from lightning_meta.training.algorithm import MetaAlgorithm
from lightning_meta.training.meta_batch import MetaBatchMode

#: Precisions the inner loop runs in: weights (and so fast weights and the inner SGD update) in
#: float32/float64; ``bf16-mixed`` autocasts only the matmuls.
INNER_LOOP_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process: Lightning's ``ModelParallelStrategy`` with data-parallel size = the
    number of processes and tensor-parallel size 1, so a config moves from 2 CPU processes to 8
    GPUs by changing only ``accelerator`` and ``devices``.

    Args:
        save_distributed_checkpoint: save sharded checkpoint folders (one file per rank) rather
            than one consolidated file.
        process_group_backend: ``gloo`` (CPU) or ``nccl`` (GPU) by default.
        timeout: for collective operations.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__("auto", 1, save_distributed_checkpoint, process_group_backend, timeout)

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (tensor parallel inside a node).
        set_data_parallel_degree(self, self.num_nodes * self.num_processes)
        super().setup_environment()


class UnsupportedSetupError(ValueError):
    """A strategy or precision that cannot run this algorithm and learner exactly."""


def check_precision(precision: str, algorithm: MetaAlgorithm) -> None:
    """Refuse precisions in which the inner loop would silently lose its gradients or updates."""
    if not algorithm.adapts_weights or precision in INNER_LOOP_PRECISIONS:
        return
    if precision.startswith("16"):
        raise UnsupportedSetupError(
            f"precision={precision!r} cannot run {type(algorithm).__name__}: float16 inner-loop gradients are "
            "not loss-scaled (Lightning's scaler only scales the outer loss) and underflow silently. Use "
            "--trainer.precision=bf16-mixed (same speed on GPUs with bfloat16, no scaling needed) or 32-true. "
            "ProtoNet, which has no inner loop, runs in 16-mixed."
        )
    raise UnsupportedSetupError(
        f"precision={precision!r} cannot run {type(algorithm).__name__}: its weights, and so the fast weights "
        "and the inner SGD update, would be in low precision (an update smaller than the weight's resolution "
        "is lost). Use --trainer.precision=bf16-mixed, which keeps weights in float32 and computes in bfloat16."
    )


def required_meta_batch_mode(sharded: bool, precision: str, *, evaluation: bool = False) -> MetaBatchMode | None:
    """The meta-batch mode a strategy or precision requires, or ``None`` where the configured one runs.

    Training: ``all_at_once`` over FSDP-sharded weights (``autograd.grad`` cannot reach them) and under ``16-*``
    precision (Lightning's loss scaling needs the one ``backward``). Evaluation: ``task_by_task`` over sharded
    weights (never vmap over them).
    """
    if evaluation:
        return "task_by_task" if sharded else None
    return "all_at_once" if sharded or precision.startswith("16") else None


def slow_bf16_message(precision: str, device_type: str) -> str | None:
    """The advice when a bfloat16 precision would run on a CPU without native bfloat16 matrix units, else ``None``.

    There torch falls back to a slow path: on one AVX2 CPU (AMD EPYC) a 512 × 576 × 1536 matmul ran at 1.2
    GFLOP/s in bfloat16 against 83 in float32 (``benchmarks/speed/run.py --roofline``), so a bf16 run is
    tens of times slower, not faster.
    """
    if device_type != "cpu" or not precision.startswith("bf16") or cpu_has_native_bf16():
        return None
    return (
        f"precision={precision!r} on a CPU without native bfloat16 matrix instructions (torch reports "
        f"{torch.backends.cpu.get_cpu_capability()}; no AVX-512 BF16 or AMX): bfloat16 matmuls take a slow path "
        "here, tens of times slower than float32. Pass --trainer.precision=32-true."
    )


def check_strategy(strategy: object, learner: Learner, algorithm: MetaAlgorithm) -> None:
    """Refuse strategies that would shard fast weights or that this library does not drive."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, FSDPStrategy):
        raise UnsupportedSetupError(
            "Lightning's FSDPStrategy (FSDP1) is not supported: it shards the fast weights, which functional "
            "inner loops then silently ignore. Use FSDP2 through "
            "--trainer.strategy=ModelParallelStrategy --trainer.strategy.data_parallel_size=N "
            "--trainer.strategy.tensor_parallel_size=1 (CPU and GPU), which keeps the fast weights replicated, "
            "or DDP (--trainer.strategy=ddp)."
        )
    if not isinstance(strategy, ModelParallelStrategy):
        return
    tensor_parallel = strategy.device_mesh["tensor_parallel"].size()  # set up before LightningModule.setup
    if tensor_parallel != 1:
        raise UnsupportedSetupError(
            f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel}: tensor parallelism is not supported "
            "for meta-learning (and its 'auto' sizes give DP=1, TP=N on one node, where nothing is sharded). Set "
            "--trainer.strategy.data_parallel_size=N (the number of devices) --trainer.strategy.tensor_parallel_size=1."
        )
    if algorithm.adapts_weights and _all_fast(learner, algorithm):
        raise UnsupportedSetupError(
            f"FSDP with {type(algorithm).__name__} and fast_weights={learner.fast_weights!r}: every weight is a fast "
            "weight, and FSDP shards only the weights the inner loop does not adapt (sharded fast weights would be "
            "silently ignored). Adapt a subset that stays replicated (fast_weights: lora, head, last_blocks:N, "
            "biases_norms), or use DDP (--trainer.strategy=ddp)."
        )


def shard(
    learner: Learner, algorithm: MetaAlgorithm, mesh: object, units: Iterable[nn.Module] | None = None
) -> list[nn.Parameter]:
    """FSDP2-shard the learner's model on ``mesh`` except its fast weights; return those (replicated).

    Each of ``units`` is its own FSDP unit (by default :func:`default_units`: the blocks of the
    model's longest ``nn.ModuleList``, its transformer layers), then the root. Resharding after
    forward and backward is off: a meta-step runs forward and backward through the backbone several
    times (inner loop, query, second order); call :func:`reshard` once the step's backward is done,
    so the next step gathers updated weights.
    """
    from torch.distributed.fsdp import fully_shard

    replicated = list(algorithm.fast_weights(learner).values()) if algorithm.adapts_weights else []
    ignored = set(replicated)
    for block in default_units(learner.model) if units is None else units:
        fully_shard(block, mesh=mesh, reshard_after_forward=False, ignored_params=ignored & set(block.parameters()))
        block.set_reshard_after_backward(False)
    fully_shard(learner.model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
    learner.model.set_reshard_after_backward(False)
    check_fast_weights_replicated(learner, algorithm)
    return replicated


def reshard(model: nn.Module) -> None:
    """Free the gathered (unsharded) weights of every FSDP unit in ``model``.

    With resharding off, FSDP would otherwise keep running the next step on the gathered copy of
    the weights from before the optimizer updated the shards.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_fast_weights_replicated(learner: Learner, algorithm: MetaAlgorithm) -> None:
    """The guard: fail loudly if any fast weight is sharded (functional_call would ignore it)."""
    from torch.distributed.tensor import DTensor

    if not algorithm.adapts_weights:
        return
    sharded = [name for name, weight in algorithm.fast_weights(learner).items() if isinstance(weight, DTensor)]
    if sharded:
        raise UnsupportedSetupError(
            f"Fast weights {sharded[:5]} are FSDP-sharded: the inner loop would silently leave them unadapted. "
            "Shard with lightning_meta.training.scaling.shard (MetaLearningModule.configure_model does), which keeps "
            "them replicated."
        )


def average_gradients(parameters: Iterable[nn.Parameter], group: object) -> None:
    """Average the gradients of replicated parameters over the data-parallel ranks (FSDP leaves them alone)."""
    import torch.distributed as dist

    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not gradients:
        return
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for gradient in gradients:
        gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
        offset += gradient.numel()


def clip_gradients(parameters: Iterable[nn.Parameter], max_value: float, by_value: bool = False) -> None:
    """Clip gradients that mix FSDP-sharded (DTensor) and replicated (plain) tensors, in place.

    By norm (default): scale every gradient by ``max_value / total norm`` when the 2-norm of all of
    them together exceeds ``max_value``: the sharded gradients' norm is taken over every rank's
    shards (one all-reduce), the replicated ones' (already equal on every rank) locally, and the
    two combined, so the result equals ``torch.nn.utils.clip_grad_norm_`` on the full gradients of
    one process. ``by_value``: clamp each gradient entry to ``[-max_value, max_value]``.
    """
    from torch.distributed.tensor import DTensor

    with_gradients = [p for p in parameters if p.grad is not None]
    sharded = [p for p in with_gradients if isinstance(p.grad, DTensor)]
    replicated = [p for p in with_gradients if not isinstance(p.grad, DTensor)]
    groups = [group for group in (sharded, replicated) if group]
    if by_value:
        for group in groups:
            nn.utils.clip_grad_value_(group, max_value)
        return
    norms = [nn.utils.get_total_norm([p.grad for p in group]) for group in groups]
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
    total = torch.stack(norms).norm()
    for group in groups:
        nn.utils.clip_grads_with_norm_(group, max_value, total)


def default_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units by default: the model's blocks (:func:`~lightning_meta.learners.fast_weights.blocks_of`)."""
    return list(blocks_of(model))


def _all_fast(learner: Learner, algorithm: MetaAlgorithm) -> bool:
    trainable = {id(p) for p in learner.parameters() if p.requires_grad}
    return trainable <= {id(p) for p in algorithm.fast_weights(learner).values()}


def keep_frozen_linear_weights_in(learner: Learner, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Cast the frozen weights of ``learner``'s linear layers to ``dtype`` in place; their former dtypes by name.

    Under ``bf16-mixed`` autocast casts every linear layer's float32 weight to bfloat16 at each use: for a
    frozen base (LoRA, or a base left out of the outer loop) that is the same cast of weights that never
    change, every forward (SmolLM2-135M: 270 MB per forward), beside a float32 copy nothing reads. Kept in
    bfloat16 (as QLoRA keeps its base low), the forward under autocast is the same bit for bit, and the
    base takes half the memory. Trained weights (adapters, fast weights, the outer loop's) stay float32, and
    so do their gradients and inner updates; so do embeddings and norms, which autocast does not cast (a
    tied output head shares the embedding). Outside autocast such a model needs its weights back:
    :func:`restore_dtypes` (the host does it when training or evaluation ends).
    """
    embeddings = {id(module.weight) for module in learner.modules() if isinstance(module, nn.Embedding)}
    former: dict[str, torch.dtype] = {}
    for name, module in learner.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):  # transformers' GPT-2 linear
            continue
        for weight_name, weight in module.named_parameters(recurse=False):
            if weight.requires_grad or id(weight) in embeddings or not weight.is_floating_point():
                continue
            former[f"{name}.{weight_name}"] = weight.dtype
            weight.data = weight.data.to(dtype)
    return former


def restore_dtypes(learner: Learner, dtypes: Mapping[str, torch.dtype]) -> None:
    """Cast ``learner``'s named weights back to ``dtypes`` (:func:`keep_frozen_linear_weights_in`'s return)."""
    weights = dict(learner.named_parameters(remove_duplicate=False))
    for name, dtype in dtypes.items():
        weights[name].data = weights[name].data.to(dtype)
