"""The one place that touches private Lightning, jsonargparse, torch and transformers attributes.

Each function here wraps a framework detail that has no public API (its docstring says why), and
``tests/test_compat.py`` checks each one against the installed framework, so a release that
renames or changes one fails a named test instead of breaking a run silently. The rest of the
package calls these functions and never the private names (``tests/test_compat.py`` greps for them).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn


def cli_hyperparameters() -> dict[str, Any] | None:
    """The config LightningCLI parsed for the module it is instantiating now, or ``None`` outside the CLI.

    Why private: LightningCLI hands that config to ``save_hyperparameters`` through a context
    variable and offers no public way to ask whether a module is being built from one. The CLI's
    record (``class_path``/``init_args`` as parsed, ``_instantiator``) is the only complete one for
    components the package cannot describe itself (a user's learner that does not keep its
    arguments), and it is what ``--ckpt_path`` reads back.
    """
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    return _given_hyperparameters.get()


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The trainer ``module`` is attached to, or ``None`` (a module used outside ``Trainer``).

    Why here: the public ``LightningModule.trainer`` raises when no trainer is attached, and only
    its exception type (``RuntimeError``, undocumented) tells that case apart.
    """
    try:
        return module.trainer
    except RuntimeError:
        return None


def batches_consumed(trainer: Trainer) -> int:
    """Training batches the fit loop has taken so far, over all epochs (a resumed run's included).

    Why here: Lightning prefetches batches, so counting what a dataloader yielded overshoots, and a
    run stopped by ``max_steps`` inside an epoch ends that epoch for Lightning, so epochs do not
    give the position either. Only the fit loop's progress counts the batches the loop used, and
    the loop (``trainer.fit_loop``, a private ``_FitLoop``) is not a documented API.
    """
    return trainer.fit_loop.total_batch_idx + 1


def set_data_parallel_degree(strategy: ModelParallelStrategy, size: int) -> None:
    """Set the data-parallel size of a ``ModelParallelStrategy`` before ``setup_environment`` builds its mesh.

    Why private: the strategy takes an explicit size only in ``__init__``, before the number of
    processes is known, and resolves ``"auto"`` to the node count (tensor parallel inside a node).
    """
    strategy._data_parallel_size = size


@contextlib.contextmanager
def reparametrized(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Run the block inside with ``module``'s named parameters replaced by ``tensors`` (differentiably).

    Why private: this is the context manager ``torch.func.functional_call`` itself uses; the
    public ``functional_call`` only runs ``module.__call__``, while activation checkpointing has to
    re-run the function transformers handed it (a ``partial`` of the block's forward).
    """
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, dict(tensors)):
        yield


def foreach_add(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """``[t + alpha * o for t, o in zip(tensors, others)]`` in one fused, differentiable kernel.

    Why private: torch has no public fused list arithmetic; ``torch._foreach_add`` is what its own
    optimizers use, and it is several times fewer kernel launches than a loop over the tensors.
    """
    return list(torch._foreach_add(list(tensors), list(others), alpha=alpha))


def under_function_transform(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.func`` transform's wrapper (inside ``vmap``: its shapes cannot depend on
    its values, so nothing may be gathered at data-dependent positions).

    Why private: ``torch.func`` has no public test for its wrapped tensors; ``torch._C._functorch`` is where
    ``vmap`` and ``grad`` keep it.
    """
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def attention_implementation(model: nn.Module) -> str:
    """The attention kernel a transformers model runs (``"eager"``, ``"sdpa"``, ...).

    Why private: transformers sets it with the public ``set_attn_implementation`` (and the
    ``attn_implementation`` argument of ``from_pretrained``) but reads it back only from
    ``config._attn_implementation``.
    """
    return model.config._attn_implementation


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers ``model``'s blocks, by transformers' current name.

    Why here: transformers 5.25 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns that it goes in v6); the releases before have only the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})


def set_block_checkpoint_function(model: nn.Module, function: Callable[..., Any]) -> list[nn.Module]:
    """Make each checkpointed block of ``model`` recompute through ``function(partial_forward, *args)``.

    Call after :func:`enable_activation_checkpointing`; returns the modules it changed (the blocks, and
    modules that hold the attribute without using it). Why private:
    transformers keeps each block's checkpoint function in ``_gradient_checkpointing_func`` (the
    public ``activation_checkpointing_enable`` only chooses torch's ``checkpoint`` options) and has no
    hook to recompute with other weights, which fast weights need.
    """
    blocks = [module for module in model.modules() if hasattr(module, "_gradient_checkpointing_func")]
    for block in blocks:
        block._gradient_checkpointing_func = function
    return blocks


def parse_object_unvalidated(parser: Any, config: dict[str, Any]) -> Any:
    """``parser.parse_object(config)`` without checking required options (a partial config as a base).

    Why private: jsonargparse validates every parsed object, and only its private
    ``_skip_validation`` lets a partial config (a checkpoint's saved options) serve as the base
    the command line completes.
    """
    return parser.parse_object(config, _skip_validation=True)


class CLIWithoutCheckpointMerge(LightningCLI):
    """LightningCLI without its own merge of a ``--ckpt_path`` checkpoint's hyper-parameters.

    Why private: LightningCLI (2.6) merges the checkpoint's hyper-parameters *over* the parsed
    command line in its private ``_parse_ckpt_path`` and offers no public hook to change the order;
    a subclass that parses the checkpoint's options itself, under the user's, switches it off here.
    """

    def _parse_ckpt_path(self) -> None:
        """Nothing: the subclass reads the checkpoint's options while it parses the arguments."""


#: jsonargparse's wording (4.53) when a class name or import path given for a class option does not resolve.
_UNRESOLVED_CLASS = (
    "Expected a dot import path string",
    "not accessible or invalid",
    "does not correspond to a subclass",
)
#: jsonargparse's wording (4.53) when a text option is given a value that YAML parses as a mapping.
_TEXT_GOT_MAPPING = re.compile(r'Parser key "([\w.]+)":\s+Expected a <class \'str\'>\. Got value: (\{.*\})')


def is_unresolved_class_error(message: str) -> bool:
    """Whether a jsonargparse error ``message`` says a class name or import path did not resolve.

    Why here: jsonargparse raises one error type for every parsing problem; only its wording tells
    this case apart (a class that resolved but failed to build says "Problem with given class_path").
    """
    return any(words in message for words in _UNRESOLVED_CLASS) and "Problem with given class_path" not in message


def text_option_given_mapping(message: str) -> tuple[str, str] | None:
    """``(key, mapping)`` when a jsonargparse error ``message`` says a text option got a YAML mapping, else ``None``.

    Why here: as for :func:`is_unresolved_class_error`, only jsonargparse's wording tells this case apart.
    """
    match = _TEXT_GOT_MAPPING.search(message)
    return None if match is None else (match.group(1), match.group(2))


#: jsonargparse's (4.53) wording for a class name that is not an importable dotted path.
_UNRESOLVED_NAME = re.compile(r"Expected a dot import path string: ([A-Za-z_]\w*)\s*$", re.MULTILINE)


def unresolved_class_name(message: str) -> str | None:
    """The plain class name (no dots) that a jsonargparse error ``message`` says did not resolve, else ``None``.

    Why here: as for :func:`is_unresolved_class_error`, only jsonargparse's wording holds it.
    """
    match = _UNRESOLVED_NAME.search(message)
    return None if match is None else match.group(1)


#: argparse's wording (Python 3.11-3.13, through jsonargparse 4.53) for a subcommand it does not know, or none.
_SUBCOMMAND_CHOICE = re.compile(
    r"argument (?:subcommand|\{[^}]*\}): invalid choice: '(?P<given>[^']*)'|expected \"subcommand\" to be one of"
)


def unknown_subcommand(message: str) -> str | None:
    """The subcommand given (``""`` when none was) when a parser error ``message`` says it is not one of the
    parser's, else ``None``.

    Why here: as for :func:`is_unresolved_class_error`, only the wording tells this case apart.
    """
    match = _SUBCOMMAND_CHOICE.search(message)
    return None if match is None else match.group("given") or ""


def claim_version_when_chosen(logger: Any) -> bool:
    """Make a TensorBoard or CSV ``logger`` whose version is not given claim its ``version_N`` folder when it
    chooses the version: on global rank 0 the folder is created with ``os.mkdir``, which fails when another run
    made it first, and then the next number is tried. Other ranks choose as before (their choice is not used).
    Returns whether it will claim one (``False``: another logger, or a version given).

    Why private: Lightning chooses the version by listing the folder (``_get_next_version``, called the first
    time anything asks for the version or ``log_dir``, before any callback runs) and creates the folder only
    later, so two runs started together both took ``version_0``. Remote folders keep Lightning's choice.
    """
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    if not isinstance(logger, TensorBoardLogger | CSVLogger) or logger._version is not None:
        return False
    listed = logger._get_next_version

    def claim() -> int:
        root = os.path.expanduser(os.path.expandvars(logger.root_dir))
        if rank_zero_only.rank != 0 or "://" in root:
            return listed()
        os.makedirs(root, exist_ok=True)
        version = listed()
        while True:
            try:
                os.mkdir(os.path.join(root, f"version_{version}"))
                return version
            except FileExistsError:
                version += 1

    logger._get_next_version = claim
    return True


def hide_lightning_pytree_deprecation() -> None:
    """Hide the ``LeafSpec`` deprecation that torch raises inside Lightning's own (private) pytree helpers.

    Why private: the warning comes from ``lightning.pytorch.utilities._pytree``, a private module,
    and is only silenced by naming it; the user's own code still gets the warning.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products natively (oneDNN's bf16 kernels: AVX-512 BF16 or AMX).

    Why private: torch has no public query for it (``torch.backends.cpu.get_cpu_capability`` names the vector
    width, not bfloat16 support); ``torch.ops.mkldnn._is_mkldnn_bf16_supported`` is what torch's own tests use.
    Where the op is missing, the answer is ``True`` (no warning rather than a wrong one).
    """
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if query is None else bool(query())
