"""The package's own words: its version and its descriptions say what ships."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

import lightning_meta
from lightning_meta.algorithms import BUILTIN

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]


def test_one_version_the_one_in_pyproject():
    assert lightning_meta.__version__ == version("lightning-meta") == PYPROJECT["version"]


@pytest.mark.parametrize("text", [PYPROJECT["description"], lightning_meta.__doc__], ids=["pyproject", "docstring"])
def test_descriptions_name_every_algorithm_that_ships(text):
    assert [cls.__name__ for cls in BUILTIN.values() if cls.__name__ not in text] == []


def test_one_time_claim_for_the_quick_start():
    """README top, README body and ``--help`` said 3-4 min, 4 min 31 s and 3 min."""
    import re

    from lightning_meta.cli import DESCRIPTION

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    pattern = r"~[\d½–-]+ min on a CPU"
    top, help_text = readme.split("\n\n")[1], DESCRIPTION.replace("\n", " ")
    assert re.findall(pattern, top) == re.findall(pattern, help_text) == ["~4½ min on a CPU"]
