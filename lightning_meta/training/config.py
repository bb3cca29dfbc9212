"""Components as ``class_path``/``init_args`` dicts: what checkpoints store and configs contain.

Components built in Python (a learner around an ``MLP``, a ``MAML`` object) are written into a
checkpoint's hyper-parameters in the same form LightningCLI writes, so ``load_from_checkpoint``
rebuilds them with the default ``weights_only=True``. This works for classes that keep each
constructor argument as an attribute of the same name, as every class of this package does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import nn

_PRIMITIVES = (str, int, float, bool, type(None))


class NotConfigurable(TypeError):
    """The object cannot be described as ``class_path``/``init_args``."""


def init_args(component: object) -> dict[str, Any]:
    """The constructor arguments of ``component``, read back from its same-named attributes."""
    signature = inspect.signature(type(component).__init__)
    values = {}
    for name, parameter in list(signature.parameters.items())[1:]:
        if parameter.kind == parameter.VAR_POSITIONAL:  # nn.Sequential(*modules): nothing names them
            raise NotConfigurable(f"{type(component).__qualname__} takes unnamed arguments (*{name})")
        if parameter.kind == parameter.VAR_KEYWORD:
            continue
        if not hasattr(component, name):
            raise NotConfigurable(f"{type(component).__qualname__} does not keep its argument {name!r}")
        values[name] = getattr(component, name)
    return values


def to_config(value: Any) -> Any:
    """``value`` as plain data: primitives and lists as they are, objects as class_path/init_args."""
    if isinstance(value, _PRIMITIVES):
        return value
    if isinstance(value, list | tuple):
        return [to_config(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_config(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_config(dataclasses.asdict(value))
    if isinstance(value, functools.partial) and isinstance(value.func, type) and not value.args:
        return {"class_path": _path(value.func), "init_args": to_config(dict(value.keywords))}
    if isinstance(value, type):
        return {"class_path": _path(value)}
    if inspect.isroutine(value):  # a lambda or function: "builtins.function" would not load
        raise NotConfigurable(
            f"the function {getattr(value, '__qualname__', value)!r} is not a class (give a class, or "
            "functools.partial(a class, keyword=...))"
        )
    if isinstance(value, nn.Module) or hasattr(value, "__dict__"):
        return {"class_path": _path(type(value)), "init_args": to_config(init_args(value))}
    raise NotConfigurable(f"cannot describe {value!r} as a config")


def _path(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise NotConfigurable(f"{cls.__qualname__} is defined inside a function and cannot be imported by path")
    return f"{cls.__module__}.{cls.__qualname__}"
