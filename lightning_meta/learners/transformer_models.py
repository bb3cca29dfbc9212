"""The Hugging Face causal LM a :class:`~lightning_meta.learners.language_models.CausalLMLearner` wraps: built from a
config (random init) or loaded from a local folder in a dtype, with peft's LoRA adapters, and activation
checkpointing that respects fast weights. Nothing is downloaded."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lightning_meta._compat import enable_activation_checkpointing, reparametrized, set_block_checkpoint_function
from lightning_meta.data.local_files import dequantized_gguf, load_pretrained, resolve_local_path
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.learners.fast_weights import adapter_parameter_names

#: The parameter dtypes a model may be built in, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# peft's target modules where its defaults don't fit: GPT-2 keeps its projections in Conv1D.
_LORA_TARGETS = {"gpt2": (["c_attn", "c_proj"], True)}


@dataclass
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) added with ``peft``; see ``peft.LoraConfig``.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; peft's default for the model type when omitted
            (GPT-2: ``c_attn`` and ``c_proj``).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None


def lora_settings(lora: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
    """``lora`` as :class:`LoraSettings` (a dict of its fields, as a config or a Python caller writes it)."""
    if not isinstance(lora, Mapping):
        return lora
    fields = [field.name for field in dataclasses.fields(LoraSettings)]
    unknown = sorted(set(lora) - set(fields))
    if unknown:
        raise ValueError(f"lora: unknown settings {unknown}; LoraSettings has {fields}.")
    return LoraSettings(**lora)


def enable_functional_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of the transformer blocks that respects fast weights.

    Hugging Face's own checkpointing recomputes a block during backward, after
    ``functional_call`` has put the module's own parameters back: the recomputation then uses θ
    instead of the adapted θ' and the gradients are silently wrong (seen on transformers 5.24).
    Here each checkpointed block records the weights it ran with and recomputes with those.
    Reentrant checkpointing does not compose with ``torch.autograd.grad`` at all.
    """
    enable_activation_checkpointing(model)
    for block in set_block_checkpoint_function(model, _checkpoint_with_current_weights):
        block._fast_weight_names = [name for name, _ in block.named_parameters()]


def _checkpoint_with_current_weights(function: functools.partial, *args: Any) -> Any:
    layer = function.args[0]  # transformers passes partial(forward, layer, **kwargs)
    # Inside functional_call the attributes hold the substituted (fast) weights, not Parameters.
    current = {name: functools.reduce(getattr, name.split("."), layer) for name in layer._fast_weight_names}

    def run(*inputs: Any) -> Any:
        with reparametrized(layer, current):
            return function(*inputs)

    return checkpoint(run, *args, use_reentrant=False)


def build_model(
    pretrained: str | None,
    model_config: dict[str, Any] | None,
    tokenizer: str,
    gguf_file: str | None,
    attn_implementation: str | None,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM in training mode: from ``pretrained`` (a local folder, ``pkg:`` path or cached hub id; with
    ``gguf_file``, a GGUF file inside it) or, when that is ``None``, from ``model_config`` (random init, with
    the vocabulary and special tokens of ``tokenizer``), in ``dtype``."""
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if pretrained is not None:
        folder = resolve_local_path(pretrained)
        if gguf_file is not None:
            folder = dequantized_gguf(folder, gguf_file)
        # from_pretrained returns eval mode (dropout off); a learner follows its host's mode like a built one.
        return load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype=dtype, **options).train()
    config = dict(model_config or {})
    if "model_type" not in config:
        raise ValueError(f"model_config needs a 'model_type' (e.g. 'gpt2', 'llama'); got keys {sorted(config)}.")
    text_tokenizer = load_tokenizer(tokenizer)
    config.setdefault("vocab_size", len(text_tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(text_tokenizer, key)
        if token_id is not None:
            config.setdefault(key, token_id)
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, **options)


def add_lora(model: PreTrainedModel, lora: LoraSettings, meta_learn_base: bool) -> nn.Module:
    """``model`` with ``lora``'s adapters (peft), only they trainable unless ``meta_learn_base``."""
    from peft import LoraConfig, get_peft_model

    targets, fan_in_fan_out = _LORA_TARGETS.get(model.config.model_type, (None, False))
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or targets,
        fan_in_fan_out=fan_in_fan_out,
    )
    peft_model = get_peft_model(model, config)
    if meta_learn_base:
        adapters = adapter_parameter_names(peft_model)
        for name, parameter in peft_model.named_parameters():
            if name not in adapters:
                parameter.requires_grad_(True)
    return peft_model
