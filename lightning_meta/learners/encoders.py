"""A learner around any Hugging Face encoder: pooled sentence embeddings, optionally an N-way head.

Without a head (``ways=None``) the learner's output is the pooled embedding, which ProtoNet turns
into class prototypes. With ``ways=N`` a linear head maps the embedding to N logits, for MAML,
FOMAML and Reptile; ``fast_weights="head"`` then adapts only that head (ANIL: Raghu et al.,
"Rapid Learning or Feature Reuse?", ICLR 2020).

The encoder is built from a config (random weights, nothing downloaded) or loaded from a local
folder with ``AutoModel.from_pretrained``. Like every learner it runs through
``torch.func.functional_call``: adapted weights are tensors in a dict, the module is never copied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.data.local_files import load_pretrained, resolve_local_path
from lightning_meta.data.tasks import Split
from lightning_meta.learners.base import ClassificationLearner, DataCheck, classification_loss

#: The default encoder: a 2-layer, width-128 BERT (~0.8 M parameters) for the embedded 4,096-token
#: WordPiece tokenizer (``embedded-wordpiece-4096``).
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 4096,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 256,
}


def build_encoder(
    encoder_path: str | None = None,
    encoder_config: Mapping[str, Any] | None = None,
    attn_implementation: str = "eager",
) -> nn.Module:
    """A Hugging Face ``AutoModel`` from a local folder, or with random weights from a config dict.

    ``encoder_config`` holds ``model_type`` and that config class's options, over the defaults of
    :data:`TINY_BERT`; given together with ``encoder_path`` its entries override the folder's config.
    """
    from transformers import AutoConfig, AutoModel

    options = dict(encoder_config or {})
    if encoder_path is not None:
        options.pop("model_type", None)
        # from_pretrained returns eval mode (dropout off); a learner follows its host's mode like a built one.
        folder = resolve_local_path(encoder_path)
        trust_remote_code = bool(options.pop("trust_remote_code", False))
        return load_pretrained(
            AutoModel, folder, trust_remote_code, attn_implementation=attn_implementation, **options
        ).train()
    options = {**TINY_BERT, **options}
    model_type = options.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **options)
    except ValueError as error:
        raise ValueError(f"encoder_config: {error}") from error
    return AutoModel.from_config(config, attn_implementation=attn_implementation)


class PooledEncoder(nn.Module):
    """``encoder`` → pooled embedding (``mean`` over real tokens, or the first token: ``cls``) → ``head``."""

    def __init__(self, encoder: nn.Module, pooling: str, head: nn.Linear | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            embedding = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            embedding = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return embedding if self.head is None else self.head(embedding)


class EncoderLearner(ClassificationLearner):
    """Few-shot text classification with a Hugging Face encoder.

    Splits hold ``input_ids``, ``attention_mask`` and ``labels`` (0..ways-1 per episode), as the
    episodic text datamodules serve them.

    Args:
        encoder_path: a local folder with a Hugging Face model (``AutoModel.from_pretrained``), or
            ``pkg:PACKAGE/dir`` for a folder inside an installed package. ``None``: a randomly
            initialised encoder built from ``encoder_config``.
        encoder_config: ``model_type`` and config options over the defaults of :data:`TINY_BERT`
            (``{"hidden_size": 256}`` widens the tiny BERT); with ``encoder_path``, overrides of
            the folder's config, passed to ``from_pretrained`` (so ``trust_remote_code: true`` here
            runs the folder's own Python code: only for folders you trust, and only when you set
            it). Its ``vocab_size`` must cover the datamodule's tokenizer.
        pooling: ``"mean"`` over non-padding tokens, or ``"cls"``: the first token's hidden state.
        ways: size of a linear N-way head on the embedding (initialised near zero), for
            MAML/FOMAML/Reptile. ``None``: no head, the output is the embedding (for ProtoNet).
            Episodes must then have at most ``ways`` classes.
        fast_weights: what the inner loop adapts, as for every learner: ``"all"``, ``"head"`` (ANIL),
            ``"last_blocks:N"`` (the last N transformer layers), or a list of these and name globs
            over ``encoder.*``/``head.*`` parameter names (``["last_blocks:1", "head"]``).
        attn_implementation: passed to transformers. ``"eager"`` by default because second-order
            MAML needs a double backward, which the fused SDPA kernels lack; ``"sdpa"`` is faster
            for ProtoNet and first-order methods.

    Example::

        from lightning_meta import EncoderLearner, MetaLearningModule
        from lightning_meta.algorithms import MAML, ProtoNet
        protonet = MetaLearningModule(EncoderLearner(pooling="mean"), ProtoNet())
        anil = MetaLearningModule(EncoderLearner(ways=5, fast_weights="head"), MAML(inner_lr=0.5))
        minilm = EncoderLearner(encoder_path="/models/all-MiniLM-L6-v2")
    """

    def __init__(
        self,
        encoder_path: str | None = None,
        encoder_config: dict[str, Any] | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        ways: int | None = None,
        fast_weights: str | list[str] = "all",
        attn_implementation: str = "eager",
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}.")
        if ways is not None and (isinstance(ways, bool) or not isinstance(ways, int) or ways < 2):
            raise ValueError(f"ways (the head size) must be an integer >= 2, or None for no head; got {ways!r}.")
        if fast_weights == "head" and ways is None:
            raise ValueError(
                "fast_weights='head' adapts the linear head, but this learner has none (ways=None). Give it "
                "ways=<the datamodule's ways>, or choose 'all', 'last_blocks:N' or name globs."
            )
        encoder = build_encoder(encoder_path, encoder_config, attn_implementation)
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            # BERT-style pooler: unused by mean/CLS pooling, and unused parameters break DDP.
            encoder.pooler = None
        hidden_size = encoder.get_input_embeddings().embedding_dim
        head = nn.Linear(hidden_size, ways) if ways is not None else None
        if head is not None:
            # Near zero: every class starts equal, which suits labels permuted per episode (Ye & Chao,
            # "How to Train Your MAML to Excel in Few-Shot Classification", ICLR 2022); the first inner
            # step then gives a centroid-like classifier. Not exactly zero, so that ProtoNet over the
            # head's outputs still gets a gradient.
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)
        model = PooledEncoder(encoder, pooling, head)
        super().__init__(model, fast_weights, input_key="input_ids", target_key="labels")
        self.encoder_path = encoder_path
        self.encoder_config = encoder_config
        self.pooling = pooling
        self.ways = ways
        self.fast_weights = fast_weights
        self.attn_implementation = attn_implementation
        self.vocab_size = encoder.get_input_embeddings().num_embeddings

    @property
    def max_positions(self) -> int | None:
        """The encoder's ``max_position_embeddings``."""
        return getattr(self.model.encoder.config, "max_position_embeddings", None)

    def predict(self, split: Split, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Pooled embeddings (no head) or head logits for a split, with ``params`` as fast weights."""
        inputs = (split[self.input_key], split.get("attention_mask"))
        if not params:
            return self.model(*inputs)
        return functional_call(self.model, dict(params), inputs, strict=False, tie_weights=True)

    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if self.ways is None:
            raise ValueError(
                "This EncoderLearner has no classification head (ways=None): its output is an embedding, "
                "which only ProtoNet uses. For MAML, FOMAML or Reptile give the learner a head with "
                "ways=<the datamodule's ways> (--model.learner.init_args.ways=5)."
            )
        return classification_loss(self.predict(split, params), split[self.target_key])

    def data_checks(self, split_name: str, split: Split) -> list[DataCheck]:
        """Finite values, token ids inside the encoder's vocabulary, labels inside the head."""
        input_ids = split[self.input_key].flatten(1)
        checks = super().data_checks(split_name, split) + [
            DataCheck(
                ((input_ids >= 0) & (input_ids < self.vocab_size)).all(1),
                f"{split_name} has token ids outside the encoder's vocabulary of {self.vocab_size} (the "
                "datamodule's tokenizer does not belong to this encoder)",
                "use the tokenizer saved with the encoder (the same folder), or raise encoder_config's vocab_size "
                "to the tokenizer's size",
            )
        ]
        if self.ways is not None and self.target_key in split:
            labels = split[self.target_key].flatten(1)
            checks.append(
                DataCheck(
                    ((labels >= 0) & (labels < self.ways)).all(1),
                    f"{split_name} has more ways (labels) than the learner's head, which has ways={self.ways} "
                    "outputs; a linear head fixes the number of ways for meta-training and testing alike",
                    f"evaluate with ways <= {self.ways}, give the learner ways=<the largest ways>, or use ProtoNet, "
                    "which handles any number of ways",
                )
            )
        return checks
