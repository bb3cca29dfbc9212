"""Episodic datamodules, installed as ``lightning_meta.datamodules``."""

from lightning_meta.datamodules.base import EpisodicDataModule
from lightning_meta.datamodules.sinusoid import SinusoidDataModule

__all__ = ["EpisodicDataModule", "SinusoidDataModule"]
