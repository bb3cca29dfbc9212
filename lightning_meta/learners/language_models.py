"""Causal language models as learners: any Hugging Face ``AutoModelForCausalLM``.

The model is built from a config (random init, for tests and the quick start) or loaded from a local folder
(:mod:`~lightning_meta.learners.transformer_models`); nothing is downloaded. Fast weights can be all weights, the
last transformer blocks, biases and norms, name globs, or LoRA adapters (via ``peft``): then the inner loop adapts
only the adapters and the outer loop meta-learns their initialization (and, with ``meta_learn_base``, the base
weights too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedModel

from lightning_meta._compat import attention_implementation, under_function_transform
from lightning_meta.data.tasks import (
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    IGNORE_INDEX,
    LABEL_WEIGHTS,
    POSITION_IDS,
    SEGMENT_IDS,
    Split,
)
from lightning_meta.learners.base import DataCheck, Learner
from lightning_meta.learners.lm_evaluation import SCORING_RULES, CausalLMEvaluation, Prefix, split_labels
from lightning_meta.learners.transformer_models import (
    DTYPES,
    LoraSettings,
    add_lora,
    build_model,
    enable_functional_checkpointing,
    lora_settings,
)

#: Model types tested to run a packed split's block mask exactly (transformers takes a 4D mask as it is; a model
#: that derives more from the 2D mask, ALiBi's positions or a sliding window, would not see the blocks).
BLOCK_MASK_MODEL_TYPES = ("gpt2", "llama")


class CausalLMLearner(CausalLMEvaluation, Learner):
    """Next-token cross-entropy of a causal LM on ``input_ids`` (padding and ``-100`` labels ignored).

    Args:
        pretrained: a local ``save_pretrained`` folder, ``pkg:NAME[/sub/dir]`` for an installed
            data package holding one, or a hub id in the local Hugging Face cache; ``None`` builds
            the model from ``model_config``.
        model_config: a Hugging Face config as a dict with ``model_type``
            (``{"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}``); the vocabulary
            size and special-token ids come from ``tokenizer`` unless given.
        tokenizer: the tokenizer the data uses (``embedded-bpe-4096`` or a local folder).
        gguf_file: a GGUF file inside ``pretrained``; dequantized once and cached as safetensors.
        fast_weights: see :class:`Learner`; default ``"lora"`` with ``lora``, else ``"all"``.
        lora: add LoRA adapters (``LoraSettings``, or a dict of its fields: ``{"r": 8, "alpha": 16}``).
        meta_learn_base: with ``lora``, also meta-learn the base weights in the outer loop
            (the inner loop still adapts only the adapters).
        attn_implementation: ``"eager"``, ``"sdpa"``, ...; second-order MAML switches to eager.
        gradient_checkpointing: non-reentrant activation checkpointing in the transformer.
        dtype: parameter dtype.
        trust_remote_code: let ``pretrained`` run its own model code (``auto_map`` in its config.json);
            off by default, and never asked on stdin.
        scoring: the rule whose choice of option is reported as ``accuracy`` (:data:`SCORING_RULES`); every
            rule is also reported as ``accuracy_<rule>`` (``calibrated`` and ``channel`` where the split carries
            their rows: :data:`~lightning_meta.data.tasks.CALIBRATION_FIELDS`, ``CHANNEL_FIELDS``).
    """

    task_type = "language_modeling"
    metric_names = (
        "loss",
        "exact_match",
        "accuracy",
        *(f"accuracy_{rule}" for rule in SCORING_RULES),
        "correct_probability",
    )

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str = "embedded-bpe-4096",
        gguf_file: str | None = None,
        fast_weights: str | list[str] | None = None,
        lora: LoraSettings | None = None,
        meta_learn_base: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float64"] = "float32",
        trust_remote_code: bool = False,
        scoring: Literal["sum", "per_token", "per_char", "calibrated", "channel"] = "sum",
    ) -> None:
        if scoring not in SCORING_RULES:
            raise ValueError(
                f"scoring={scoring!r} is not a scoring rule: use one of {', '.join(SCORING_RULES)} "
                "(--model.learner.init_args.scoring)."
            )
        if (pretrained is None) == (model_config is None):
            raise ValueError(
                "Give exactly one of pretrained (a local folder) or model_config (a dict with model_type)."
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
        model = build_model(
            pretrained,
            model_config,
            tokenizer,
            gguf_file,
            attn_implementation,
            DTYPES[dtype],
            trust_remote_code=trust_remote_code,
        )
        lora = lora_settings(lora)
        if lora is not None:
            model = add_lora(model, lora, meta_learn_base)
        elif meta_learn_base:
            raise ValueError(
                "meta_learn_base=True only applies with lora=...; without LoRA all weights are meta-learned."
            )
        if gradient_checkpointing:  # after LoRA: each block records its weights as peft renamed them
            enable_functional_checkpointing(model.get_base_model() if lora is not None else model)
        super().__init__(
            model,
            fast_weights=fast_weights if fast_weights is not None else ("lora" if lora is not None else "all"),
            input_key="input_ids",
            target_key="labels",
        )
        self.pretrained = pretrained
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.gguf_file = gguf_file
        self.fast_weights = fast_weights
        self.lora = lora
        self.meta_learn_base = meta_learn_base
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.scoring = scoring

    @property
    def dtype(self) -> str:  # the constructor argument, for configs and checkpoints
        return self.dtype_name

    def rebuilt_weights(self) -> list[str]:
        """The frozen weights (the base under LoRA) of a model loaded from ``pretrained``: loading it again
        restores them, so checkpoints hold only the trained weights. A model built from ``model_config`` has
        a random base, which checkpoints keep."""
        if self.pretrained is None:
            return []
        return [name for name, weight in self.named_parameters(remove_duplicate=False) if not weight.requires_grad]

    @property
    def transformer(self) -> PreTrainedModel:
        """The Hugging Face model (under the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def max_positions(self) -> int | None:
        """The model's ``max_position_embeddings`` (GPT-2: ``n_positions``)."""
        return getattr(self.transformer.config, "max_position_embeddings", None)

    def predict(self, split: Split, params: Mapping[str, Tensor] | None = None, prefix: Prefix | None = None) -> Tensor:
        """Logits ``(sequences, tokens, vocabulary)``; with ``prefix``, of rows that continue after it."""
        return self(**self._inputs_after(split, prefix), params=params).logits

    def _inputs_after(self, split: Split, prefix: Prefix | None) -> dict[str, Any]:
        """:meth:`model_inputs`, continuing after ``prefix`` where given."""
        inputs = self.model_inputs(split)
        return inputs if prefix is None else inputs | prefix.continued(inputs["attention_mask"])

    def model_inputs(self, split: Split) -> dict[str, Tensor | None]:
        """The model's inputs for ``split``: its tokens and padding mask; for a packed split (:data:`SEGMENT_IDS`:
        several sequences in one row, sharing their first tokens) each token's position in its own sequence and a
        block mask in place of the padding mask: a token attends to the earlier tokens of its own segment and of
        segment 0 (the shared tokens), never to another segment's, so each segment's outputs are its sequence's
        run alone (:meth:`block_mask_refusal` says where the model cannot take it)."""
        inputs = {"input_ids": split["input_ids"], "attention_mask": split.get("attention_mask")}
        if SEGMENT_IDS not in split:
            return inputs
        segments = split[SEGMENT_IDS]
        order = torch.arange(segments.shape[-1], device=segments.device)
        key, query = segments[..., None, :], segments[..., :, None]
        allowed = (order[:, None] >= order[None, :]) & (key >= 0) & ((key == 0) | (key == query))
        # A padding row attends to itself: no row without keys (a softmax over nothing is NaN).
        allowed = (allowed | (order[:, None] == order[None, :]))[..., None, :, :]
        if attention_implementation(self.transformer) != "sdpa":  # eager adds the mask to the scores
            dtype = self.transformer.dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return inputs | {"attention_mask": allowed, "position_ids": split[POSITION_IDS]}

    def block_mask_refusal(self) -> str | None:
        """Why this model cannot run a packed split's block mask (:meth:`model_inputs`) exactly, or ``None``."""
        model_type = self.transformer.config.model_type
        if model_type not in BLOCK_MASK_MODEL_TYPES:
            return (
                f"{model_type!r} models are not tested with a block (4D) attention mask "
                f"(tested: {', '.join(BLOCK_MASK_MODEL_TYPES)})"
            )
        if (implementation := attention_implementation(self.transformer)) not in ("eager", "sdpa"):
            return f"{implementation!r} attention takes no block (4D) attention mask (eager and sdpa do)"
        return None

    def encode_prefix(self, input_ids: Tensor, params: Mapping[str, Tensor] | None = None) -> Prefix:
        """Run ``input_ids`` ``(tokens,)``, every one real, once: a :class:`Prefix` for rows that continue after
        them (:meth:`evaluation_metrics`' ``prefixes``), without gradients (it serves scoring)."""
        ids = input_ids[None]
        with torch.no_grad():
            cache = self(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, params=params
            ).cache
        return Prefix(cache, ids.shape[1])

    def data_checks(self, split_name: str, split: Split) -> list[DataCheck]:
        """Token ids and labels (of the options too) inside the model's vocabulary (labels may be -100: ignored)."""
        vocab_size = self.transformer.config.vocab_size
        fix = f"use the same tokenizer for the data and the model (learner: {self.tokenizer!r})"
        checks = super().data_checks(split_name, split)
        for name in ("input_ids", CHOICE_INPUT_IDS):
            if name in split:
                ids = split[name].flatten(1)
                checks.append(
                    DataCheck(
                        ((ids >= 0) & (ids < vocab_size)).all(1),
                        f"{split_name}[{name!r}] has token ids outside the model's vocabulary of {vocab_size}: the "
                        "data's tokenizer differs from the model's",
                        fix,
                    )
                )
        for name in ("labels", CHOICE_LABELS):
            if name in split:
                labels = split[name].flatten(1)
                checks.append(
                    DataCheck(
                        (((labels >= 0) & (labels < vocab_size)) | (labels == IGNORE_INDEX)).all(1),
                        f"{split_name}[{name!r}] has labels that are neither token ids of the vocabulary of "
                        f"{vocab_size} nor {IGNORE_INDEX} (ignored)",
                        fix,
                    )
                )
        return checks

    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        read = self.read_logits(self.model_inputs(split), split_labels(split)[:, 1:], params)
        weights = split.get(LABEL_WEIGHTS)
        loss = F.cross_entropy(
            read.logits, read.targets, ignore_index=IGNORE_INDEX, reduction="mean" if weights is None else "none"
        )
        if weights is not None:  # a packed split: a label its sequences share counts once per sequence
            weights = read.at(weights[:, 1:]) * (read.targets != IGNORE_INDEX)
            loss = (loss * weights).sum() / weights.sum()
        return loss, {"loss": loss.detach()}

    def read_logits(
        self, inputs: Mapping[str, Any], targets: Tensor, params: Mapping[str, Tensor] | None = None
    ) -> ReadLogits:
        """The float32 logits of the positions whose next token is read (``targets[:, t]``, the token after
        position ``t``, is not ``-100``), with those targets (:class:`ReadLogits`); ``inputs``: the model's.

        The hidden states are gathered at those positions before the output embeddings, so the LM head
        (SmolLM2: a fifth of a forward's FLOPs) and the float32 log-softmax run only where a loss or a score
        reads them (MetaICL and MultiTask: the outputs; option scoring: the options): the same metrics and
        gradients as full logits read there. One host sync (the positions' count). Under a ``torch.func``
        transform (``vmap``), where shapes cannot depend on the data, every position runs.
        """
        if under_function_transform(inputs["input_ids"]):
            logits = self(**inputs, params=params).logits[:, : targets.shape[1]]
            return ReadLogits(_float32(logits).flatten(0, 1), targets.flatten(), None, None)
        rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        with _head_reads(self.transformer.get_output_embeddings(), rows, positions):
            logits = self(**inputs, params=params).logits[0]
        return ReadLogits(_float32(logits), targets[rows, positions], rows, positions)

    def vmap_refusal(self) -> str | None:
        implementation = attention_implementation(self.transformer)
        if implementation != "eager":
            return (
                f"{implementation!r} attention inspects the mask's values (data-dependent control flow); "
                "attn_implementation='eager' runs under vmap"
            )
        return super().vmap_refusal()

    def prepare_second_order(self) -> None:
        # Fused SDPA kernels have no double backward ("derivative for
        # aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
        if (implementation := attention_implementation(self.transformer)) != "eager":
            rank_zero_info(
                f"Second-order MAML: switching {type(self.transformer).__name__} from "
                f"{implementation!r} to eager attention (fused attention kernels "
                "have no double backward). Use FOMAML or first_order=True to keep fused attention."
            )
            self.transformer.set_attn_implementation("eager")


@dataclass
class ReadLogits:
    """:meth:`CausalLMLearner.read_logits`: float32 ``logits`` ``(read positions, vocabulary)`` and their
    ``targets``; ``rows`` and ``positions``: where each was read (``None``: every position of every sequence, in
    order, the targets ``-100`` where not read)."""

    logits: Tensor
    targets: Tensor
    rows: Tensor | None
    positions: Tensor | None

    def at(self, values: Tensor) -> Tensor:
        """``values`` ``(sequences, positions)`` (aligned with the targets) at the read positions."""
        return values.flatten() if self.rows is None else values[self.rows, self.positions]

    def per_row(self, values: Tensor, sequences: int) -> Tensor:
        """``values`` (one per read position) summed per sequence."""
        if self.rows is None:
            return values.view(sequences, -1).sum(1)
        return values.new_zeros(sequences).index_add(0, self.rows, values)

    def greedy(self, sequences: int) -> Tensor:
        """Per sequence: whether greedy decoding writes every read target (each the most likely next token)."""
        wrong = (self.logits.argmax(-1) != self.targets) & (self.targets != IGNORE_INDEX)
        return self.per_row(wrong.float(), sequences) == 0


@contextlib.contextmanager
def _head_reads(head: nn.Module, rows: Tensor, positions: Tensor) -> Iterator[None]:
    """Inside: the output embeddings run only on the hidden states at ``(rows, positions)``, as one sequence.

    A pre-hook on the head rather than a head applied here: whatever the model does after its head (a logit
    scale, soft-capping) still applies, to the gathered logits.
    """

    def gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows, positions][None], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _float32(logits: Tensor) -> Tensor:
    """Logits reduced in float32 under low precision, for a stable loss."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
