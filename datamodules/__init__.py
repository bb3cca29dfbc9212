"""Episodic datamodules, installed as ``lightning_meta.datamodules``."""

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.datamodules.episodic_classification import EpisodicClassificationDataModule
from lightning_meta.datamodules.language_modeling import LanguageModelingTasksDataModule
from lightning_meta.datamodules.learn2learn_tasks import Learn2LearnDataModule
from lightning_meta.datamodules.litdata_text import LitDataTextDataModule
from lightning_meta.datamodules.masked_words import MaskedWordTasksDataModule
from lightning_meta.datamodules.packed_text import PackedTextDataModule
from lightning_meta.datamodules.sinusoid import SinusoidDataModule
from lightning_meta.datamodules.text_classification import TextClassificationDataModule
from lightning_meta.datamodules.text_to_text import TextToTextTasksDataModule

__all__ = [
    "EpisodicClassificationDataModule",
    "EpisodicDataModule",
    "LanguageModelingTasksDataModule",
    "Learn2LearnDataModule",
    "LitDataTextDataModule",
    "MaskedWordTasksDataModule",
    "PackedTextDataModule",
    "SinusoidDataModule",
    "TextClassificationDataModule",
    "TextToTextTasksDataModule",
]
