"""lightning-meta models in EleutherAI's lm-evaluation-harness: the ``lm_eval`` model ``lightning-meta``.

Importing this module registers :class:`LightningMetaLM` under that name; it needs the optional
dependency ``lm-eval`` (``pip install "lightning-meta[eval]"``). The model is the harness's own
``HFLM`` (its ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``, batching and
caching) over the causal LM that ``checkpoint=`` names: a ``.ckpt`` of ``lightning-meta fit`` or
``pretrain`` (or a sharded checkpoint folder), an export folder (any ``save_pretrained`` folder), or
a LoRA adapter folder (peft's format, ``lightning-meta export --adapter_dir``) over ``pretrained=``.
The same folder given to ``--model hf`` gives the same log-likelihoods.

Example::

    import lm_eval
    import lightning_meta.handoff.harness  # noqa: F401  (registers "lightning-meta")

    lm_eval.simple_evaluate(model="lightning-meta", model_args="checkpoint=runs/meta.ckpt", tasks=["arc_easy"])

From the shell, ``lightning-meta lm-eval --model_args checkpoint=runs/meta.ckpt --tasks arc_easy`` takes
``lm-eval run``'s options (:func:`run_command`); lm-eval 0.4.13's own command finds no model that
another package registers.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils_hf import get_dtype
except ModuleNotFoundError as error:
    if not (error.name or "").startswith("lm_eval"):
        raise
    raise ModuleNotFoundError(
        'The lm-evaluation-harness model needs lm-eval, an optional dependency: pip install "lightning-meta[eval]".',
        name="lm_eval",
    ) from None

from lightning_meta.data.local_files import load_pretrained, resolve_local_path
from lightning_meta.data.tokenization import check_tokenizer, load_tokenizer
from lightning_meta.handoff.checkpoint_models import model_from_checkpoint, read_checkpoint
from lightning_meta.handoff.export_folder import read_provenance

#: The name ``lm_eval`` knows the model by (``--model lightning-meta``).
MODEL_NAME = "lightning-meta"
_SUBCOMMANDS = ("run", "ls", "validate")  # lm-eval 0.4.13's; anything else is `run`'s options
#: HFLM's warnings for a caller who hands it a model object: this class builds the model itself.
_MODEL_OBJECT_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def load_model(
    checkpoint: str, pretrained: str | None = None, tokenizer: str | None = None, trust_remote_code: bool = False
) -> tuple[Any, Any, dict[str, Any]]:
    """The causal LM at ``checkpoint`` (LoRA merged), its tokenizer, and where it comes from.

    Args:
        checkpoint: a ``.ckpt`` of ``lightning-meta fit``/``pretrain`` or a sharded checkpoint folder; an
            export folder (or any ``save_pretrained`` folder, ``pkg:`` path or cached hub id); or a LoRA adapter
            folder (peft's ``adapter_config.json``) over ``pretrained``.
        pretrained: the base model: of an adapter folder (default: the one its config names), or of a
            checkpoint that leaves its frozen base out (default: the one it was trained on), checked by fingerprint.
        tokenizer: the tokenizer, when the one the checkpoint names is not on this machine (checked against its
            fingerprint where one is recorded).
        trust_remote_code: let a model folder run its own Python code (``auto_map``); never taken from a file.
    """
    if Path(checkpoint).expanduser().is_file():
        return _from_checkpoint(checkpoint, pretrained, tokenizer, trust_remote_code)
    try:
        folder = resolve_local_path(checkpoint)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"checkpoint={checkpoint!r}: {error} Give a .ckpt of lightning-meta fit or pretrain, an export folder, "
            "or a LoRA adapter folder."
        ) from None
    from peft.utils import CONFIG_NAME as ADAPTER_CONFIG

    if (folder / ADAPTER_CONFIG).is_file():
        return _from_adapter(folder, pretrained, tokenizer, trust_remote_code)
    if not (folder / "config.json").is_file():  # a sharded checkpoint (read_checkpoint says what it lacks)
        return _from_checkpoint(checkpoint, pretrained, tokenizer, trust_remote_code)
    if pretrained is not None:
        raise ValueError(
            f"pretrained={pretrained!r}: checkpoint={checkpoint!r} is a whole model folder, with no base to "
            "rebuild. Leave pretrained out."
        )
    from transformers import AutoModelForCausalLM

    # dtype="auto" keeps the saved dtype, as `--model hf` loads the same folder.
    model = load_pretrained(AutoModelForCausalLM, folder, trust_remote_code, dtype="auto")
    provenance = read_provenance(folder) or {}
    if tokenizer is not None and provenance.get("tokenizer_fingerprint"):
        check_tokenizer(provenance["tokenizer"], provenance["tokenizer_fingerprint"], tokenizer, f"The model {folder}")
    text_tokenizer = load_tokenizer(tokenizer or _tokenizer_folder(folder))
    return model, text_tokenizer, provenance | {"checkpoint": str(folder.resolve())}


def _from_checkpoint(
    checkpoint: str, pretrained: str | None, tokenizer: str | None, trust_remote_code: bool
) -> tuple[Any, Any, dict[str, Any]]:
    loaded, source = read_checkpoint(checkpoint)
    model, provenance = model_from_checkpoint(
        loaded, tokenizer=tokenizer, pretrained=pretrained, trust_remote_code=trust_remote_code
    )
    text_tokenizer = provenance.pop("tokenizer_object")
    return model, text_tokenizer, provenance | source | {"checkpoint": source["source_checkpoint"]}


def _from_adapter(
    folder: Path, pretrained: str | None, tokenizer: str | None, trust_remote_code: bool
) -> tuple[Any, Any, dict[str, Any]]:
    from peft import PeftModel
    from peft.utils import CONFIG_NAME as ADAPTER_CONFIG
    from transformers import AutoModelForCausalLM

    base = pretrained or json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"checkpoint={str(folder)!r} is a LoRA adapter that names no base model: give pretrained=FOLDER."
        )
    try:
        base_folder = resolve_local_path(base)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"The base model {base!r} of the LoRA adapter {folder} is not on this machine ({error}) Give it with "
            "pretrained=FOLDER."
        ) from None
    model = load_pretrained(AutoModelForCausalLM, base_folder, trust_remote_code, dtype="auto")
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    # An adapter folder holds no tokenizer unless someone put one there: the base's is the adapter's.
    name = tokenizer or _tokenizer_folder(folder, base_folder)
    source = {"checkpoint": str(folder.resolve()), "pretrained": str(base_folder.resolve()), "lora": {"merged": True}}
    return model, load_tokenizer(name), source


def _tokenizer_folder(*folders: Path) -> str:
    """The first of ``folders`` that holds a tokenizer (transformers makes an empty one from a folder that holds
    none, and every option would then score 0)."""
    for folder in folders:
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return str(folder)
    raise FileNotFoundError(
        f"No tokenizer in {' or '.join(str(folder) for folder in folders)}: give the model's with tokenizer=NAME "
        "(a tokenizer folder, or embedded-bpe-4096 for a model trained with it)."
    )


@register_model(MODEL_NAME)
class LightningMetaLM(HFLM):
    """The harness's ``HFLM`` over a lightning-meta model (see :func:`load_model` for ``checkpoint``).

    Args:
        checkpoint: a ``.ckpt`` (or sharded checkpoint folder), an export folder, or a LoRA adapter folder.
        pretrained: the base model of an adapter, or of a checkpoint that leaves its frozen base out.
        tokenizer: a replacement for the tokenizer the checkpoint names (same token ids, checked).
        trust_remote_code: let a model folder run its own code; only ever from this argument.
        device: where the model runs; default the GPU when there is one, else the CPU.
        dtype: ``float32``, ``bfloat16``, ``float16``, ...; default the dtype the model was saved in.
        batch_size, max_batch_size, max_length, add_bos_token, prefix_token_id, truncation, logits_cache,
            softmax_dtype: as ``--model hf`` takes them.
    """

    def __init__(
        self,
        checkpoint: str,
        pretrained: str | None = None,
        tokenizer: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = 64,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        truncation: bool = False,
        logits_cache: bool = True,
        softmax_dtype: str | None = None,
    ) -> None:
        model, text_tokenizer, self.provenance = load_model(str(checkpoint), pretrained, tokenizer, trust_remote_code)
        if dtype not in (None, "auto"):
            model = model.to(get_dtype(dtype))
        # HFLM keeps a model it is given where it is: place it first.
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        hflm_logger = logging.getLogger(HFLM.__module__)
        hflm_logger.addFilter(_drop_model_object_warnings)
        try:
            super().__init__(
                pretrained=model,
                tokenizer=text_tokenizer,
                batch_size=batch_size,
                max_batch_size=max_batch_size,
                max_length=max_length,
                add_bos_token=add_bos_token,
                prefix_token_id=prefix_token_id,
                truncation=truncation,
                logits_cache=logits_cache,
                softmax_dtype=softmax_dtype,
            )
        finally:
            hflm_logger.removeFilter(_drop_model_object_warnings)
        self.checkpoint = str(checkpoint)

    def get_model_info(self) -> dict[str, Any]:
        """What the results file records about the model: size, dtype and where it comes from (HFLM's asks
        the hub about ``pretrained``, here a model object)."""
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "lightning_meta": self.provenance,
        }


def _drop_model_object_warnings(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_MODEL_OBJECT_WARNINGS)


def run_command(args: Sequence[str]) -> None:
    """``lightning-meta lm-eval ARGS``: lm-eval's own command line (``lm-eval``), with this model registered.

    ``run`` is put first unless another subcommand (``ls``, ``validate``) is, and ``--model lightning-meta``
    unless ``--model`` (or a ``--config`` file's ``model:``) names one; every other option is ``lm-eval run``'s
    (``--tasks``, ``--include_path``, ``--num_fewshot``, ``--limit``, ``--output_path``, ``--batch_size``, ...),
    and the results files are lm-eval's own.
    """
    from lm_eval.__main__ import cli_evaluate

    args = list(args)
    if not args or args[0] not in _SUBCOMMANDS:
        args.insert(0, "run")
    if args[0] == "run" and not _names_a_model(args[1:]):
        args[1:1] = ["--model", MODEL_NAME]
    command_line = sys.argv
    sys.argv = ["lightning-meta lm-eval", *args]  # lm-eval's entry point reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = command_line


def _names_a_model(args: list[str]) -> bool:
    """Whether ``lm-eval run`` options name the model: ``--model``/``-M``, or ``model:`` in a ``--config`` file."""
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--model", "-M"):
            return True
        if name in ("--config", "-C"):
            path = value or (args[index + 1] if index + 1 < len(args) else "")
            if Path(path).is_file():
                import yaml

                config = yaml.safe_load(Path(path).read_text())
                if isinstance(config, dict) and config.get("model"):
                    return True
    return False
