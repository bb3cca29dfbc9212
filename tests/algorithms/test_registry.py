"""Finding algorithms by name, by dotted path and through the entry-point group."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lightning_meta import algorithms
from lightning_meta.algorithms import FOMAML, MAML, ProtoNet, Reptile, UnknownAlgorithmError


def test_builtins_by_lowercase_and_class_name():
    assert isinstance(algorithms.get("fomaml", inner_lr=0.1), FOMAML)
    assert algorithms.get("fomaml", inner_lr=0.1).inner_lr == 0.1
    assert algorithms.resolve("Reptile") is Reptile
    assert algorithms.resolve("MAML") is MAML
    assert algorithms.resolve("protonet") is ProtoNet


def test_dotted_path():
    assert algorithms.resolve("lightning_meta.algorithms.reptile.Reptile") is Reptile


def test_unknown_name_lists_known_names():
    with pytest.raises(
        UnknownAlgorithmError,
        match=r"Unknown algorithm 'mamll'\. Known algorithms: anil, fomaml, maml, mamlplusplus, metaicl, metasgd, "
        r"multitask, protonet, reptile",
    ):
        algorithms.get("mamll")


def test_dotted_path_to_something_else():
    with pytest.raises(UnknownAlgorithmError, match="is not a MetaAlgorithm subclass"):
        algorithms.resolve("torch.nn.Linear")
    with pytest.raises(UnknownAlgorithmError, match="Cannot import algorithm"):
        algorithms.resolve("no_such_pkg.Algo")


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A third-party package registering `lightning_meta.algorithms` is found by its entry-point name."""
    (tmp_path / "my_plugin.py").write_text(
        textwrap.dedent("""
        from lightning_meta.algorithms import MAML

        class ImplicitMAML(MAML):
            pass
    """)
    )
    dist_info = tmp_path / "my_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[lightning_meta.algorithms]\nimaml = my_plugin:ImplicitMAML\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = algorithms.available()
    assert found["imaml"].__name__ == "ImplicitMAML"
    assert type(algorithms.get("imaml", inner_lr=0.2)).__name__ == "ImplicitMAML"
    sys.modules.pop("my_plugin", None)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MAML(inner_steps=0), "inner_steps must be an integer >= 1, got 0"),
        (lambda: FOMAML(inner_lr=0.0), "inner_lr must be a finite number > 0, got 0.0"),
        (lambda: Reptile(inner_lr=-1.0), "inner_lr must be a finite number > 0, got -1.0"),
        (lambda: MAML(inner_lr=float("inf")), "inner_lr must be a finite number > 0, got inf"),
        (lambda: MAML(eval_inner_steps=0), "eval_inner_steps must be an integer >= 1"),
        (lambda: Reptile(eval_inner_lr=0.0), "eval_inner_lr must be a finite number > 0 or None"),
        (lambda: algorithms.get("reptile", inner_steps=2.5), "inner_steps must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_inner_loop_options(build, message):
    with pytest.raises(ValueError, match=message):
        build()
