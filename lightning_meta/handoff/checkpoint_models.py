"""The model a lightning-meta checkpoint holds, as a Hugging Face model: from single-file checkpoints of
:class:`~lightning_meta.MetaLearningModule` (causal-LM and encoder learners; LoRA adapters merged) and of
:class:`~lightning_meta.handoff.pretraining.CausalLMPretraining`, and from sharded checkpoint folders
(``ModelParallelStrategy``/FSDP2 and ``FSDPStrategy`` layouts, consolidated with torch's ``dcp_to_torch_save``), with
the provenance an export records. Read by :func:`~lightning_meta.handoff.export.export`, ``pretrain``'s
``init_from`` and the lm-evaluation-harness model."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_meta.data.tokenization import check_tokenizer, fingerprint_of, load_tokenizer
from lightning_meta.handoff.export_folder import ADAPTER_FILE, write_atomically
from lightning_meta.training.checkpoint_loading import saved_hyperparameters
from lightning_meta.training.checkpoints import (
    LEARNER_PREFIX,
    CheckpointError,
    check_local_checkpoint_path,
    load_checkpoint_file,
    restore_rebuilt_weights,
)

_PRETRAINING_PREFIX = "model."


_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards


_LIGHTNING_EXTRAS = "meta.pt"  # beside the shards: what Lightning saves apart from the weights and optimizer states


#: How the callers of :func:`model_from_checkpoint` allow a checkpoint's model folder to run its own code.
_REMOTE_CODE_OPTIONS = "lightning-meta export --trust_remote_code=true (pretrain: --model.trust_remote_code=true)"


def read_checkpoint(ckpt_path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint as one dict (a sharded folder consolidated) and ``{"source_checkpoint", "source_sha256"}``."""
    path = check_local_checkpoint_path(ckpt_path)
    if path.is_dir():
        checkpoint = _consolidate(path)
    else:
        checkpoint = load_checkpoint_file(path)
    return checkpoint, {"source_checkpoint": str(path.resolve()), "source_sha256": _sha256(path)}


def _consolidate(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint folder as one checkpoint with the weights under ``state_dict`` (FSDPStrategy saves
    them as ``model``); optimizer states are left as saved (an export does not read them)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (folder / _DCP_METADATA).is_file():
        raise CheckpointError(
            f"{str(folder)!r} is a folder but not a sharded checkpoint (no {_DCP_METADATA} file from "
            "torch.distributed.checkpoint). Give a .ckpt file or the checkpoint folder an FSDP run wrote."
        )
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as error:  # noqa: BLE001 (a damaged index reaches the unpickler)
        raise CheckpointError(f"{folder / _DCP_METADATA} is damaged ({type(error).__name__}).") from error
    shards = sorted({item.relative_path for item in metadata.storage_data.values()})
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"The sharded checkpoint {str(folder)!r} is missing {len(missing)} of its {len(shards)} shard files: "
            f"{', '.join(missing)}. Copy the whole folder (every rank's file), or use another checkpoint."
        )
    try:
        checkpoint = _load_shards(folder)
    except Exception as error:  # noqa: BLE001 (truncated shards fail deep inside torch.distributed.checkpoint)
        raise CheckpointError(
            f"The sharded checkpoint {str(folder)!r} cannot be read: a shard is truncated or damaged "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Use another checkpoint."
        ) from error
    if "model" in checkpoint and "state_dict" not in checkpoint:  # FSDPStrategy's layout
        checkpoint["state_dict"] = checkpoint.pop("model")
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(folder)!r} is a sharded torch checkpoint but not a Lightning one (no state_dict).")
    return checkpoint


def _load_shards(folder: Path) -> dict[str, Any]:
    """Every shard of ``folder`` gathered into one dict (in memory), and Lightning's ``meta.pt`` beside them."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="lightning-meta-consolidate-") as scratch:
        single = Path(scratch) / "checkpoint.pt"
        dcp_to_torch_save(folder, single)
        checkpoint = torch.load(single, map_location="cpu", weights_only=True)
    extras = folder / _LIGHTNING_EXTRAS
    if extras.is_file():
        checkpoint.update(torch.load(extras, map_location="cpu", weights_only=True))
    return checkpoint


def model_from_checkpoint(
    checkpoint: Mapping[str, Any],
    tokenizer: str | None = None,
    adapter_dir: str | None = None,
    pretrained: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The Hugging Face model in a lightning-meta checkpoint (LoRA merged) and its provenance.

    Args:
        checkpoint: a loaded checkpoint (:func:`read_checkpoint`).
        tokenizer: a replacement for the tokenizer the checkpoint names (same token ids, checked).
        adapter_dir: with LoRA, also ``save_pretrained`` the adapters alone there, before merging.
        pretrained: a replacement for the pretrained model a checkpoint that leaves out its frozen weights
            rebuilds them from (same weights, checked by fingerprint).
        trust_remote_code: the caller allows the learner's pretrained folder to run its own code, as the
            checkpoint's hyper-parameters ask; without it such a checkpoint is refused.
    """
    saved = dict(checkpoint.get("lightning_meta") or {})
    if "tokenizer" not in saved:  # an encoder's tokenizer is the datamodule's, recorded in its state
        for value in checkpoint.values():
            if isinstance(value, Mapping) and "tokenizer_fingerprint" in value and "tokenizer" in value:
                saved |= {"tokenizer": value["tokenizer"], "tokenizer_fingerprint": value["tokenizer_fingerprint"]}
                break
    hparams = _plain(checkpoint.get("hyper_parameters") or {})
    state = checkpoint["state_dict"]
    if saved.get("module") == "pretraining":
        model, provenance = _pretrained_model(saved, state)
    elif isinstance(hparams.get("learner"), Mapping) and "class_path" in hparams["learner"]:
        if pretrained is not None and (hparams["learner"].get("init_args") or {}).get("pretrained") is None:
            raise ValueError(
                f"pretrained={pretrained!r}: this checkpoint's learner loads no pretrained model (it is built from "
                "its model_config, whose weights the checkpoint holds). Leave --pretrained out."
            )
        # Only the caller switches a model folder's own code on, never the file.
        hparams = saved_hyperparameters(
            {**checkpoint, "hyper_parameters": hparams},
            "The checkpoint",
            pretrained=pretrained,
            trust_remote_code=trust_remote_code,
            allow=_REMOTE_CODE_OPTIONS,
        )[0]
        model, provenance = _meta_learned_model(hparams, saved, state, tokenizer, adapter_dir)
    else:
        raise CheckpointError(
            "This checkpoint is not from lightning-meta: it holds neither a MetaLearningModule's learner nor a "
            "pretraining model (hyper-parameters: "
            f"{sorted(hparams)[:8]}). Export checkpoints written by lightning-meta fit or pretrain."
        )
    name = tokenizer or provenance.get("tokenizer")
    if name is None:
        raise CheckpointError("The checkpoint names no tokenizer; give --tokenizer FOLDER.")
    provenance["tokenizer_object"] = _loadable_tokenizer(name)
    if tokenizer is not None and provenance.get("tokenizer_fingerprint"):
        check_tokenizer(provenance["tokenizer"], provenance["tokenizer_fingerprint"], tokenizer, "The checkpoint")
    provenance["tokenizer_fingerprint"] = fingerprint_of(name)
    provenance |= {
        "steps_trained": int(checkpoint.get("global_step", 0)),
        "epochs": int(checkpoint.get("epoch", 0)),
        "validation": provenance.get("validation") or _validation_metrics(checkpoint),
    }
    return model, provenance


def _meta_learned_model(
    hparams: dict[str, Any],
    saved: dict[str, Any],
    state: Mapping[str, Tensor],
    tokenizer: str | None,
    adapter_dir: str | None,
) -> tuple[Any, dict[str, Any]]:
    from lightning_meta.learners.language_models import CausalLMLearner

    learner_config = _plain(hparams["learner"])
    init_args = dict(learner_config.get("init_args") or {})
    if learner_config["class_path"].endswith("EncoderLearner"):
        return _encoder_model(learner_config, init_args, saved, state, tokenizer)
    if not learner_config["class_path"].endswith("CausalLMLearner"):
        raise CheckpointError(
            f"The checkpoint's learner is {learner_config['class_path']}; export writes Hugging Face models: "
            "causal language models (CausalLMLearner) and encoders (EncoderLearner)."
        )
    name = saved.get("tokenizer") or init_args.get("tokenizer", "embedded-bpe-4096")
    if tokenizer is not None:
        init_args["tokenizer"] = tokenizer  # only decides the vocabulary size of a model built from a config
    _loadable_tokenizer(tokenizer or name)
    try:
        learner = CausalLMLearner(
            **{key: _lora_settings(value) if key == "lora" else value for key, value in init_args.items()}
        )
    except FileNotFoundError as error:
        if init_args.get("pretrained") is None:
            raise
        raise FileNotFoundError(
            f"{error} The checkpoint's learner loads its pretrained model from there: give its folder on this machine "
            "with --pretrained FOLDER (for a checkpoint that leaves out its frozen weights, checked by fingerprint)."
        ) from None
    state = dict(state)
    restore_rebuilt_weights(state, saved, learner, LEARNER_PREFIX)
    _load_weights(learner, state, LEARNER_PREFIX, "learner")
    fast_parameter_count = sum(p.numel() for p in learner.fast_parameters().values())
    model = learner.model
    lora = None
    if hasattr(model, "merge_and_unload"):
        if adapter_dir is not None:
            write_atomically(Path(adapter_dir).expanduser(), model.save_pretrained, True, ADAPTER_FILE)
        model = model.merge_and_unload()
        lora = {"merged": True, "adapter_dir": adapter_dir, "settings": init_args.get("lora")}
    return model, {
        "module": "MetaLearningModule",
        "algorithm": _plain(hparams.get("algorithm")),
        "learner": learner_config,
        "fast_weights": learner.fast_weights if learner.fast_weights is not None else ("lora" if lora else "all"),
        "fast_parameter_count": fast_parameter_count,
        "lora": lora,
        "optimizer": _plain(hparams.get("optimizer")),
        "tokenizer": name,
        "tokenizer_fingerprint": saved.get("tokenizer_fingerprint"),
    }


def _encoder_model(
    learner_config: dict[str, Any],
    init_args: dict[str, Any],
    saved: dict[str, Any],
    state: Mapping[str, Tensor],
    tokenizer: str | None,
) -> tuple[Any, dict[str, Any]]:
    """The encoder of an ``EncoderLearner`` (``AutoModel.from_pretrained`` loads it); an N-way head is task-specific
    and not exported (its size is recorded)."""
    from lightning_meta.learners.encoders import EncoderLearner

    learner = EncoderLearner(**init_args)
    _load_weights(learner, state, LEARNER_PREFIX, "learner")
    name = tokenizer or saved.get("tokenizer")
    return learner.model.encoder, {
        "module": "MetaLearningModule",
        "learner": learner_config,
        "fast_weights": learner.fast_weights,
        "head_not_exported": {"ways": learner.ways} if learner.ways is not None else None,
        "pooling": learner.pooling,
        "tokenizer": name,
        "tokenizer_fingerprint": saved.get("tokenizer_fingerprint"),
    }


def _pretrained_model(saved: dict[str, Any], state: Mapping[str, Tensor]) -> tuple[Any, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(saved["hf_config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = AutoModelForCausalLM.from_config(config)
    _load_weights(model, state, _PRETRAINING_PREFIX, "model")
    return model, {
        "module": "CausalLMPretraining",
        "pretrained_from": saved.get("init_from"),
        "initial_provenance": saved.get("initial_provenance"),
        "tokenizer": saved.get("tokenizer"),
        "tokenizer_fingerprint": saved.get("tokenizer_fingerprint"),
        "validation": saved.get("validation"),
    }


def _load_weights(module: nn.Module, state: Mapping[str, Tensor], prefix: str, what: str) -> None:
    """Load the entries of ``state`` under ``prefix`` into ``module``; every weight must fit."""
    weights = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"The checkpoint's state_dict has no {what} weights (no {prefix!r} keys).")
    result = module.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"The checkpoint's weights do not fit its {what}: missing {result.missing_keys[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. It was written by another version of the model; export it there."
        )


def _loadable_tokenizer(name: str) -> Any:
    """The tokenizer ``name``, or an error that says how to give it."""
    try:
        return load_tokenizer(name)
    except (FileNotFoundError, OSError) as error:
        raise FileNotFoundError(
            f"The checkpoint was trained with tokenizer {name!r}, which is not on this machine ({error}). Give its "
            "folder with --tokenizer FOLDER (it is checked against the checkpoint's tokenizer fingerprint)."
        ) from None


def _lora_settings(value: Any) -> Any:
    from lightning_meta.learners.language_models import LoraSettings

    return LoraSettings(**value) if isinstance(value, Mapping) else value


def _plain(value: Any) -> Any:
    """Hyper-parameters as plain dicts (LightningCLI saves jsonargparse namespaces)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items() if key != "_instantiator"}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _validation_metrics(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """The monitored metrics of the checkpoint's ``ModelCheckpoint`` callbacks (latest and best)."""
    metrics = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        monitor = state.get("monitor") if isinstance(state, Mapping) else None
        if not monitor:
            continue
        for key, name in (("current_score", monitor), ("best_model_score", f"best {monitor}")):
            if isinstance(state.get(key), Tensor | float):
                metrics[name] = float(state[key])
    return metrics


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
