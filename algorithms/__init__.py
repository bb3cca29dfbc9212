"""Meta-learning algorithms and their registry.

Built-ins are found by lowercase name (``get("fomaml", inner_lr=0.1)``) from Python and by class
name (``--model.algorithm=FOMAML``) from the CLI. Third-party packages add algorithms through the
entry-point group ``lightning_meta.algorithms``::

    [project.entry-points."lightning_meta.algorithms"]
    my_algo = "my_pkg.algos:MyAlgo"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from lightning_meta.algorithms.anil import ANIL
from lightning_meta.algorithms.fomaml import FOMAML
from lightning_meta.algorithms.maml import MAML
from lightning_meta.algorithms.maml_plus_plus import MAMLPlusPlus
from lightning_meta.algorithms.meta_sgd import MetaSGD
from lightning_meta.algorithms.metaicl import MetaICL
from lightning_meta.algorithms.multi_task import MultiTask
from lightning_meta.algorithms.protonet import ProtoNet
from lightning_meta.algorithms.reptile import Reptile
from lightning_meta.training.algorithm import MetaAlgorithm, MetaBatchRunner, MetaLoss
from lightning_meta.training.inner_loop import (
    SGD,
    InnerLoopAlgorithm,
    InnerUpdate,
    LearnedRates,
    inner_loop,
    inner_steps,
)

ENTRY_POINT_GROUP = "lightning_meta.algorithms"

BUILTIN: dict[str, type[MetaAlgorithm]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "protonet": ProtoNet,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "mamlplusplus": MAMLPlusPlus,
    "multitask": MultiTask,
    "metaicl": MetaICL,
}


class UnknownAlgorithmError(ValueError):
    """Raised for a name that no built-in, plugin or import path resolves to."""


def available() -> dict[str, type[MetaAlgorithm]]:
    """All algorithms by lowercase name: built-ins, then entry-point plugins (which are imported)."""
    found = dict(BUILTIN)
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        algorithm = entry_point.load()
        if not (isinstance(algorithm, type) and issubclass(algorithm, MetaAlgorithm)):
            raise TypeError(
                f"Entry point {entry_point.name!r} = {entry_point.value!r} in group {ENTRY_POINT_GROUP!r} is not a "
                "MetaAlgorithm subclass."
            )
        found.setdefault(entry_point.name.lower(), algorithm)
    return found


def resolve(name: str) -> type[MetaAlgorithm]:
    """The algorithm class for a lowercase name, a class name (``"FOMAML"``) or a dotted import path."""
    known = available()
    if name.lower() in known:
        return known[name.lower()]
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            candidate = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise UnknownAlgorithmError(f"Cannot import algorithm {name!r}: {error}") from error
        if isinstance(candidate, type) and issubclass(candidate, MetaAlgorithm):
            return candidate
        raise UnknownAlgorithmError(f"{name!r} is not a MetaAlgorithm subclass.")
    raise UnknownAlgorithmError(
        f"Unknown algorithm {name!r}. Known algorithms: {', '.join(sorted(known))}; or give a dotted "
        "path to your own MetaAlgorithm subclass (my_pkg.algos.MyAlgo)."
    )


def get(name: str, **init_args: Any) -> MetaAlgorithm:
    """Build an algorithm by name: ``get("fomaml", inner_lr=0.1, inner_steps=5)``."""
    return resolve(name)(**init_args)


__all__ = [
    "ANIL",
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "FOMAML",
    "MAML",
    "MAMLPlusPlus",
    "MetaSGD",
    "MetaICL",
    "MultiTask",
    "SGD",
    "InnerLoopAlgorithm",
    "InnerUpdate",
    "LearnedRates",
    "MetaAlgorithm",
    "MetaBatchRunner",
    "MetaLoss",
    "ProtoNet",
    "Reptile",
    "UnknownAlgorithmError",
    "available",
    "get",
    "inner_loop",
    "inner_steps",
    "resolve",
]
