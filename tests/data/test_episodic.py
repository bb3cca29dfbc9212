"""The episodic datamodule base (``data/episodic.py``): its stream options are one vocabulary for every datamodule."""

from __future__ import annotations

import inspect

import pytest

import lightning_meta.datamodules as datamodules
from lightning_meta.data.episodic import EpisodicDataModule

STREAM_OPTIONS = [name for name in inspect.signature(EpisodicDataModule.__init__).parameters if name != "self"]
SUBCLASSES = sorted(
    name
    for name in datamodules.__all__
    if isinstance(getattr(datamodules, name), type)
    and issubclass(getattr(datamodules, name), EpisodicDataModule)
    and getattr(datamodules, name) is not EpisodicDataModule
)


def test_the_base_has_the_stream_options():
    assert {"meta_batch_size", "num_val_tasks", "num_test_tasks", "seed", "allow_data_change"} <= set(STREAM_OPTIONS)
    assert len(SUBCLASSES) >= 6


@pytest.mark.parametrize("name", SUBCLASSES)
def test_every_episodic_datamodule_takes_every_stream_option_of_the_base(name):
    # One vocabulary: a datamodule may choose its own defaults, but no stream option goes missing from its
    # command line (Sinusoid and Learn2Learn had lost allow_data_change).
    parameters = inspect.signature(getattr(datamodules, name).__init__).parameters
    assert [option for option in STREAM_OPTIONS if option not in parameters] == []
    for option in STREAM_OPTIONS:
        assert parameters[option].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def test_allow_data_change_reaches_the_base():
    assert datamodules.SinusoidDataModule(allow_data_change=True).allow_data_change is True
