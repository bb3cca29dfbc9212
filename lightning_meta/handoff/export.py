"""The hand-off: a lightning-meta checkpoint as a Hugging Face ``save_pretrained`` folder.

``export(ckpt_path, output_dir)`` writes safetensors weights with no wrapper prefixes,
``config.json``, the tokenizer, ``generation_config.json`` and ``meta_learning.json`` (where the
weights come from: algorithm and options, fast weights, steps, final validation metrics, source
checkpoint and its sha256, tokenizer fingerprint). ``AutoModelForCausalLM.from_pretrained`` then
gives the logits the learner in the checkpoint gives. It reads single-file checkpoints of
:class:`~lightning_meta.MetaLearningModule` (causal-LM learners) and of
:class:`~lightning_meta.handoff.pretraining.CausalLMPretraining`, and sharded checkpoint folders
(``ModelParallelStrategy``/FSDP2 and ``FSDPStrategy`` layouts), consolidated with torch's
``dcp_to_torch_save``. :class:`ExportCallback` writes the same folder at the end of ``fit``, under DDP and FSDP too.

The folder is written next to its destination and renamed into place, so an existing export is
never left half-replaced.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta.data.local_files import write_folder_atomically
from lightning_meta.data.tokenization import check_tokenizer, fingerprint_of, load_tokenizer
from lightning_meta.training.checkpoint_loading import saved_hyperparameters
from lightning_meta.training.checkpoints import (
    LEARNER_PREFIX,
    CheckpointError,
    check_local_checkpoint_path,
    load_checkpoint_file,
    restore_rebuilt_weights,
)
from lightning_meta.version import VERSION

#: The provenance file an export holds beside the weights.
PROVENANCE_FILE = "meta_learning.json"
_PRETRAINING_PREFIX = "model."
_ADAPTER_FILE = "adapter_config.json"  # what peft's save_pretrained writes: marks an earlier adapter export
_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
_LIGHTNING_EXTRAS = "meta.pt"  # beside the shards: what Lightning saves apart from the weights and optimizer states
#: How the callers of :func:`model_from_checkpoint` allow a checkpoint's model folder to run its own code.
_REMOTE_CODE_OPTIONS = "lightning-meta export --trust_remote_code=true (pretrain: --model.trust_remote_code=true)"


def export(
    ckpt_path: str,
    output_dir: str,
    overwrite: bool = False,
    adapter_dir: str | None = None,
    tokenizer: str | None = None,
    pretrained: str | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Export a lightning-meta checkpoint as a Hugging Face folder (``lightning-meta export``).

    Args:
        ckpt_path: a ``.ckpt`` file written by ``lightning-meta fit`` or ``pretrain``, or a sharded
            checkpoint folder (FSDP / ``ModelParallelStrategy``).
        output_dir: the folder to write; refused if it exists, unless ``overwrite``.
        overwrite: replace an earlier export at ``output_dir`` (a folder holding ``meta_learning.json``),
            only once the new folder is complete; any other existing path is refused.
        adapter_dir: with LoRA, also write the adapters alone here (peft's format); the main folder
            always holds the merged weights.
        tokenizer: the tokenizer folder to ship, when the one the checkpoint names is not on this machine;
            it must give the same token ids (checked against the checkpoint's fingerprint).
        pretrained: the pretrained model to rebuild the frozen weights from, for a checkpoint that leaves them
            out (LoRA on a pretrained model), when the one it names is not on this machine; it must hold the
            same weights (checked against the checkpoint's fingerprint).
        trust_remote_code: let the checkpoint's pretrained model folder run its own Python code (``auto_map``
            in its config.json), when the checkpoint was trained with it; never taken from the checkpoint.
    """
    output = Path(output_dir).expanduser()
    source_path = check_local_checkpoint_path(ckpt_path)
    folders = [(output, PROVENANCE_FILE)] + ([(Path(adapter_dir).expanduser(), _ADAPTER_FILE)] if adapter_dir else [])
    for folder, marker in folders:
        _refuse_existing(folder, overwrite, source_path, marker)
        _check_writable(folder)
    checkpoint, source = read_checkpoint(ckpt_path)
    model, provenance = model_from_checkpoint(
        checkpoint,
        tokenizer=tokenizer,
        adapter_dir=adapter_dir,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
    )
    provenance.update(source)
    write_export(model, provenance, output, overwrite=overwrite)
    rank_zero_info(f"Exported {ckpt_path} to {output} (AutoModelForCausalLM.from_pretrained('{output}')).")
    return output


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
            _write_atomically(Path(adapter_dir).expanduser(), model.save_pretrained, True, _ADAPTER_FILE)
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


def write_export(model: Any, provenance: dict[str, Any], output: Path, overwrite: bool = False) -> None:
    """Write ``model`` (``save_pretrained``), its tokenizer and provenance to ``output``, atomically."""
    provenance = dict(provenance)
    text_tokenizer = provenance.pop("tokenizer_object")
    provenance["lightning_meta_version"] = VERSION

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        text_tokenizer.save_pretrained(staging)
        if model.can_generate() and not (staging / "generation_config.json").exists():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")

    _write_atomically(output, write, overwrite)


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The ``meta_learning.json`` of an exported folder, or ``None`` for another Hugging Face folder."""
    path = Path(folder) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _refuse_existing(output: Path, overwrite: bool, source: Path | None = None, marker: str = PROVENANCE_FILE) -> None:
    """Refuse an existing ``output`` unless ``overwrite`` and it is an earlier export (it holds ``marker``)
    that holds no ``source``.

    ``--overwrite`` replaces exports only: never a run folder, the checkpoint being exported (or a folder
    above it), a plain file, or anything else that happens to be there.
    """
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(
            f"{output} already exists. Give another --output_dir, or --overwrite=true to replace it (the old folder "
            "is kept until the new one is complete)."
        )
    resolved = output.resolve()
    if source is not None and (resolved == source.resolve() or resolved in source.resolve().parents):
        raise FileExistsError(
            f"{output} holds the checkpoint being exported ({source}): --overwrite would delete it. Give a new "
            "--output_dir outside the run folder, e.g. exports/NAME."
        )
    if not (output.is_dir() and (output / marker).is_file()) or output.is_symlink():
        raise FileExistsError(
            f"{output} exists and is not an earlier export (no {marker} in it): --overwrite only replaces a folder "
            "lightning-meta export wrote. Give a new --output_dir, or move that one away yourself."
        )


def _check_writable(output: Path) -> None:
    """Fail before any model is loaded when ``output`` cannot be written beside (read-only disk, no permission)."""
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        probe = Path(tempfile.mkdtemp(dir=parent, prefix=".lightning-meta-write-check-"))
    except OSError as error:
        raise PermissionError(
            f"Cannot write to {parent} ({error.strerror}): {output} cannot be created there. Give an --output_dir "
            "on a writable file system."
        ) from None
    probe.rmdir()


def _write_atomically(output: Path, write: Any, overwrite: bool, marker: str = PROVENANCE_FILE) -> None:
    """``write(staging)`` into a new folder beside ``output``, then rename it into place (an earlier export
    at ``output`` is replaced only when ``overwrite`` allows it, see :func:`_refuse_existing`)."""
    _refuse_existing(output, overwrite, marker=marker)
    write_folder_atomically(
        output, write, replace=True, what="the export", remedy=", or give an --output_dir on another disk"
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


class ExportCallback(Callback):
    """Export the model as a Hugging Face folder at the end of ``fit`` (and at each best validation).

    Works single-process, under DDP and under FSDP2: the full state dict is gathered on every rank
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``; ``save_pretrained`` on a
    sharded model crashes), then rank 0 writes and the others wait.

    Args:
        output_dir: where the final export goes; by default ``export`` in the run's log folder
            (``lightning_logs/version_N/export``).
        best_dir: also export here each time ``monitor`` improves at validation.
        monitor: the logged validation figure that decides "best".
        mode: ``min`` or ``max``: which direction of ``monitor`` is better.
        overwrite: replace an ``output_dir``/``best_dir`` another run wrote.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        best_dir: str | None = None,
        monitor: str = "val/query_loss_post",
        mode: str = "min",
        overwrite: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        self.output_dir = output_dir
        self.best_dir = best_dir
        self.monitor = monitor
        self.mode = mode
        self.overwrite = overwrite
        self._best: float | None = None
        self._written: set[Path] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path(trainer.log_dir or trainer.default_root_dir) / "export")
        if stage == "fit" and trainer.is_global_zero:  # fail before training, not after it
            for folder in filter(None, (self.output_dir, self.best_dir)):
                _refuse_existing(Path(folder).expanduser(), self.overwrite)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.best_dir is None or trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._best is None or (value < self._best if self.mode == "min" else value > self._best):
            self._best = value
            self.export(trainer, pl_module, Path(self.best_dir).expanduser())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module, Path(self.output_dir).expanduser())

    def export(self, trainer: Trainer, pl_module: LightningModule, output: Path) -> None:
        """Gather the full weights on every rank; rank 0 writes ``output``."""
        state = _full_state_dict(pl_module)
        if trainer.is_global_zero:
            checkpoint = {
                "state_dict": state,
                "hyper_parameters": dict(pl_module.hparams),
                "global_step": trainer.global_step,
                "epoch": trainer.current_epoch,
            }
            pl_module.on_save_checkpoint(checkpoint)  # the tokenizer and, for pretraining, the model config
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            # The run's own options, which built the learner this run trains: trusted as the run trusts them.
            model, provenance = model_from_checkpoint(checkpoint, trust_remote_code=True)
            provenance |= {"validation": metrics, "source_checkpoint": None, "exported_during": "fit"}
            write_export(model, provenance, output, overwrite=self.overwrite or output in self._written)
            self._written.add(output)
            rank_zero_info(f"Exported the model at step {trainer.global_step} to {output}.")
        trainer.strategy.barrier("lightning_meta_export")


def _full_state_dict(module: LightningModule) -> dict[str, Tensor]:
    """Every weight in full, on the CPU, on every rank (FSDP2 shards gathered)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
