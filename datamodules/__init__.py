"""Episodic datamodules, installed as ``lightning_meta.datamodules``."""

from lightning_meta.datamodules.base import EpisodicDataModule
from lightning_meta.datamodules.language_modeling import LanguageModelingTasksDataModule
from lightning_meta.datamodules.sinusoid import SinusoidDataModule

__all__ = ["EpisodicDataModule", "LanguageModelingTasksDataModule", "SinusoidDataModule"]
from lightning_meta.datamodules.episodic_classification import EpisodicClassificationDataModule  # noqa: E402
from lightning_meta.datamodules.text_classification import TextClassificationDataModule  # noqa: E402

__all__ += ["EpisodicClassificationDataModule", "TextClassificationDataModule"]
from lightning_meta.datamodules.learn2learn_tasks import Learn2LearnDataModule  # noqa: E402

__all__ += ["Learn2LearnDataModule"]
