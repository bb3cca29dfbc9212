"""Model adapters: how a model becomes a loss over a dict of fast weights. `Learner` (the
contract, fast-weight selection, data checks), regression/classification heads, `CausalLMLearner`
for Hugging Face causal LMs (LoRA via peft) and `EncoderLearner` for encoders. Builds on `data`."""

from lightning_meta.learners.base import (
    ClassificationLearner,
    DataCheck,
    DataError,
    FastWeights,
    Learner,
    RegressionLearner,
    check_sequence_length,
    classification_loss,
)
from lightning_meta.learners.encoders import EncoderLearner
from lightning_meta.learners.fast_weights import is_normalization, resolve_fast_weights
from lightning_meta.learners.language_models import CausalLMLearner, LoraSettings
from lightning_meta.learners.models import MLP

__all__ = [
    "MLP",
    "CausalLMLearner",
    "ClassificationLearner",
    "DataCheck",
    "DataError",
    "EncoderLearner",
    "FastWeights",
    "Learner",
    "LoraSettings",
    "RegressionLearner",
    "check_sequence_length",
    "classification_loss",
    "is_normalization",
    "resolve_fast_weights",
]
