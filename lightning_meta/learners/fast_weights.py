"""Which of a model's weights are fast (adapted by the inner loop): ``all``, ``head``, ``biases_norms``,
``last_blocks:N`` (the model's repeated blocks, :func:`blocks_of`), ``lora`` (the adapter weights peft's tuner layers
declare) and name globs, in one rule (:func:`resolve_fast_weights`) whatever the learner."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

#: torch's batch norms by their public classes (a lazy one becomes its plain class at the first forward).
BATCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)

_SELECTORS = ("all", "head", "biases_norms", "lora")


def adapter_parameter_names(model: nn.Module) -> set[str]:
    """The names of ``model``'s adapter weights, as peft declares them: in each of its tuner layers
    (``BaseTunerLayer``, LoRA's among them), the parameters under the layer's ``adapter_layer_names``
    (``lora_A``, ``lora_B``, ``lora_embedding_A``, ...), not a name convention. Empty without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover (peft is a dependency)
        return set()
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attribute in module.adapter_layer_names:
            holder = getattr(module, attribute, None)
            if isinstance(holder, nn.Module):
                prefix = f"{module_name}.{attribute}".removeprefix(".")
                names.update(f"{prefix}.{name}" for name, _ in holder.named_parameters())
    return names


def resolve_fast_weights(model: nn.Module, spec: str | Sequence[str], head: str | None = None) -> list[str]:
    """Names of the trainable parameters of ``model`` selected by ``spec`` (see :class:`Learner`).

    The one implementation of the ``fast_weights`` option: every learner calls it.
    """
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not trainable:
        raise ValueError("The model has no trainable parameters: nothing to meta-learn.")
    if not isinstance(spec, str):
        chosen: set[str] = set()
        for entry in spec:
            if entry in _SELECTORS or entry.startswith("last_blocks:"):
                chosen.update(resolve_fast_weights(model, entry, head))
            else:
                chosen.update(name for name in trainable if fnmatch.fnmatchcase(name, entry))
        selected = [name for name in trainable if name in chosen]
        if not selected:
            raise ValueError(f"fast_weights={list(spec)!r} matches no trainable parameter; parameters are: {trainable}")
        return selected
    if spec == "all":
        return trainable
    if spec == "head":
        head_name = head if head is not None else _last_module_with_parameters(model)
        modules = dict(model.named_modules())
        if head_name not in modules:
            raise ValueError(f"head={head_name!r} is not a submodule of the model; submodules: {sorted(modules)}")
        selected = _names_of(model, modules[head_name].parameters())
    elif spec == "biases_norms":
        norms = [module for module in model.modules() if is_normalization(module)]
        norm_names = set(_names_of(model, (p for module in norms for p in module.parameters(recurse=False))))
        selected = [name for name in trainable if name.endswith("bias") or name in norm_names]
    elif spec == "lora":
        adapters = adapter_parameter_names(model)
        selected = [name for name in trainable if name in adapters]
        if not selected:
            raise ValueError("fast_weights='lora' but the model has no trainable LoRA adapters: set lora=... too.")
    elif spec.startswith("last_blocks:"):
        selected = _last_blocks(model, spec)
    else:
        renamed = re.fullmatch(r"last-(\d+)", spec)
        hint = (
            f" 'last-N' is now spelled 'last_blocks:N' on every learner, and means the blocks only: use "
            f"['last_blocks:{renamed.group(1)}', 'head'] to adapt the head too."
            if renamed
            else ""
        )
        raise ValueError(
            f"fast_weights={spec!r} is not understood: use 'all', 'head', 'last_blocks:N', 'biases_norms', "
            f"'lora', or a list of these and name globs such as ['{trainable[-1]}'].{hint}"
        )
    selected = [name for name in selected if name in set(trainable)]
    if not selected:
        raise ValueError(f"fast_weights={spec!r} matches no trainable parameter; parameters are: {trainable}")
    return selected


def _names_of(model: nn.Module, parameters: Iterable[nn.Parameter]) -> list[str]:
    # By identity: a tied weight (GPT-2's lm_head) is listed under its first name only.
    wanted = {id(p) for p in parameters}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


def is_normalization(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (LayerNorm, GroupNorm, batch norm, RMSNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, *BATCH_NORMS)) or ("norm" in type(module).__name__.lower())


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's blocks: its longest ``nn.ModuleList`` (a transformer's layers), empty if it has none.

    The one rule for "the blocks": ``fast_weights="last_blocks:N"`` adapts the last N of them, and
    FSDP2 shards each as its own unit (:func:`lightning_meta.training.scaling.default_units`).
    """
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    return max(lists, key=len) if lists else nn.ModuleList()


def _last_blocks(model: nn.Module, spec: str) -> list[str]:
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        count = 0
    blocks = blocks_of(model)
    if count < 1 or not blocks:
        raise ValueError(
            f"fast_weights={spec!r}: give last_blocks:N with N >= 1, for a model whose blocks form an nn.ModuleList."
        )
    if count > len(blocks):
        raise ValueError(
            f"fast_weights={spec!r}: the model has {len(blocks)} blocks; use last_blocks:1 .. "
            f"last_blocks:{len(blocks)}."
        )
    return _names_of(model, (p for block in list(blocks)[-count:] for p in block.parameters()))


def _last_module_with_parameters(model: nn.Module) -> str:
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    return owners[-1]
