"""Ordinary causal-LM pretraining, started from a meta-learned model: the second stage of the pipeline.

``lightning-meta pretrain`` trains :class:`CausalLMPretraining` on
:class:`~lightning_meta.datamodules.PackedTextDataModule` blocks. The model comes from an exported
folder (``lightning-meta export``, or any ``save_pretrained`` folder), directly from a
meta-training checkpoint (the same weights the export would hold: LoRA merged), or from a config
(random init, the control).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning import Callback, LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_meta._compat import attached_trainer, cli_hyperparameters, enable_activation_checkpointing
from lightning_meta.data.local_files import dequantized_gguf, is_hub_id, resolve_local_path
from lightning_meta.data.tokenization import (
    check_data_tokenizer,
    check_tokenizer,
    check_tokenizer_record,
    tokenizer_record,
)
from lightning_meta.handoff.checkpoint_models import model_from_checkpoint, read_checkpoint
from lightning_meta.handoff.export_folder import read_provenance
from lightning_meta.learners.base import check_sequence_length
from lightning_meta.learners.transformer_models import DTYPES, build_model
from lightning_meta.training.checkpoint_loading import saved_hyperparameters
from lightning_meta.training.checkpoints import check_local_checkpoint_path, load_checkpoint_file
from lightning_meta.training.config import NotConfigurable, to_config
from lightning_meta.training.preemption import PreemptionCheckpoint
from lightning_meta.training.scaling import slow_bf16_message


class CausalLMPretraining(LightningModule):
    """Next-token training of a Hugging Face causal LM on packed blocks (``{"input_ids": ...}``).

    Logs ``train/loss``, ``train/perplexity`` and ``train/tokens_per_second`` every step, and
    ``val/loss`` and ``val/perplexity`` (over every held-out token) at validation. Under
    ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` each transformer block
    and the root are FSDP2-sharded.

    Args:
        init_from: an exported folder (``lightning-meta export``; any ``save_pretrained`` folder works),
            a hub id in the local Hugging Face cache (``HuggingFaceTB/SmolLM2-135M``), or a ``.ckpt`` of
            ``lightning-meta fit`` (its learner's model, LoRA merged) or of ``pretrain``.
        model_config: instead of ``init_from``, a Hugging Face config dict with ``model_type`` (random
            init; vocabulary and special tokens from ``tokenizer``).
        tokenizer: the tokenizer the data uses. With ``init_from`` it must give the token ids the model was
            trained with (checked against the export's fingerprint); by default the export folder's own.
        gguf_file: a GGUF file inside the ``init_from`` folder; dequantized once and cached.
        optimizer: the optimizer, called with the parameters.
        lr_scheduler: optional scheduler, called with the optimizer; stepped every step.
        attn_implementation: ``"eager"``, ``"sdpa"``, ...
        gradient_checkpointing: non-reentrant activation checkpointing in the transformer.
        dtype: parameter dtype.
        trust_remote_code: let ``init_from`` (a folder) run its own model code (``auto_map`` in its
            config.json); off by default, and never asked on stdin.
    """

    progress_label = "Pretraining"  # the progress bar's name for the run

    def __init__(
        self,
        init_from: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float64"] = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if (init_from is None) == (model_config is None):
            raise ValueError(
                "Give exactly one of init_from (an exported folder or a lightning-meta .ckpt) or model_config "
                "(a dict with model_type, for random init)."
            )
        hparams = cli_hyperparameters()  # LightningCLI hands over the config it parsed
        if hparams is None:  # plain data, so that checkpoints load with weights_only=True (and export can read them)
            hparams = {
                "init_from": init_from,
                "model_config": model_config,
                "tokenizer": tokenizer,
                "gguf_file": gguf_file,
                "attn_implementation": attn_implementation,
                "gradient_checkpointing": gradient_checkpointing,
                "dtype": dtype,
                "trust_remote_code": trust_remote_code,
            }
            try:
                hparams |= {"optimizer": to_config(optimizer), "lr_scheduler": to_config(lr_scheduler)}
            except NotConfigurable as error:
                rank_zero_warn(f"The optimizer and scheduler are not saved in the hyper-parameters ({error}).")
        self.init_from = init_from
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.initial_provenance: dict[str, Any] | None = None
        if init_from is None:
            self.tokenizer = tokenizer or "embedded-bpe-4096"
            self.model = build_model(None, model_config, self.tokenizer, None, attn_implementation, DTYPES[dtype])
        else:
            loaded = self._load(init_from, tokenizer, gguf_file, attn_implementation, DTYPES[dtype], trust_remote_code)
            self.model, self.tokenizer = loaded
        # What the tokenizer resolved to (the export's own by default), so that Lightning's merge with the
        # datamodule's hparams (which refuses two values for one key) sees the name the data gives too.
        self.save_hyperparameters(dict(hparams) | {"tokenizer": self.tokenizer})
        self.model.train()  # from_pretrained gives a model in eval mode (dropout off)
        if gradient_checkpointing:
            # No functional inner loop here, so Hugging Face's own (non-reentrant) checkpointing is exact.
            enable_activation_checkpointing(self.model)
        self.val_loss = MeanMetric()
        self._last_step_time: float | None = None

    def _load(
        self,
        init_from: str,
        tokenizer: str | None,
        gguf_file: str | None,
        attn_implementation: str | None,
        dtype: torch.dtype,
        trust_remote_code: bool,
    ) -> tuple[Any, str]:
        if init_from.startswith("pkg:") or Path(init_from).expanduser().is_dir() or is_hub_id(init_from):
            folder = resolve_local_path(init_from)
            if gguf_file is not None:
                folder = dequantized_gguf(folder, gguf_file)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"init_from={init_from!r} holds no config.json: give a folder written by lightning-meta export "
                    "(or save_pretrained), a .ckpt of lightning-meta fit or pretrain, or gguf_file for a GGUF model."
                )
            provenance = read_provenance(folder) or {}
            trained_with = provenance.get("tokenizer", str(folder))
            fingerprint = provenance.get("tokenizer_fingerprint")
            model = build_model(str(folder), None, "", None, attn_implementation, dtype, trust_remote_code)
            # The name the data uses too (a GGUF package's own folder holds its tokenizer), not the cache
            # folder it was dequantized to: Lightning refuses a module and a datamodule naming two tokenizers.
            default_tokenizer = init_from
        else:
            checkpoint, source = read_checkpoint(check_local_checkpoint_path(init_from))
            model, provenance = model_from_checkpoint(checkpoint, trust_remote_code=trust_remote_code)
            provenance.pop("tokenizer_object")
            provenance |= source
            trained_with, fingerprint = provenance["tokenizer"], provenance["tokenizer_fingerprint"]
            # Every weight trains here; a LoRA learner's base was frozen, and merging keeps it so.
            model = model.to(dtype).requires_grad_(True)
            if attn_implementation:
                model.set_attn_implementation(attn_implementation)
            default_tokenizer = trained_with
        self.initial_provenance = provenance
        chosen = tokenizer or default_tokenizer
        if fingerprint:
            check_tokenizer(trained_with, fingerprint, chosen, f"The model in {init_from}")
        rank_zero_info(f"Pretraining from {init_from} ({type(model).__name__}, tokenizer {chosen}).")
        return model, chosen

    def setup(self, stage: str) -> None:
        """Refuse data the model cannot read (other token ids, longer blocks than its positions) before any step."""
        if message := slow_bf16_message(self.trainer.precision, self.device.type):
            rank_zero_warn(message)
        block_size = getattr(self.trainer.datamodule, "block_size", None)
        if isinstance(block_size, int):
            positions = getattr(self.model.config, "max_position_embeddings", None)
            check_sequence_length(block_size, positions, "block_size", "lower --data.init_args.block_size")
        data_tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if isinstance(data_tokenizer, str) and data_tokenizer != self.tokenizer:
            check_data_tokenizer(self.tokenizer, data_tokenizer)
            # Same token ids under two names: Lightning's hparams merge would stop the run with a traceback.
            raise ValueError(
                f"The model's tokenizer is {self.tokenizer!r} and the data's {data_tokenizer!r}: the same token ids "
                f"under two names, and a run records one. Give the data the model's: "
                f"--data.init_args.tokenizer={self.tokenizer}"
            )

    def configure_model(self) -> None:
        """Under FSDP2 (``ModelParallelStrategy``): each transformer block, then the root, is a shard unit."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from lightning_meta.training.scaling import default_units

        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        tensor_parallel = self.device_mesh["tensor_parallel"].size()
        if tensor_parallel != 1:
            raise ValueError(
                f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel}: pretraining uses FSDP2 data "
                "parallelism only. Set --trainer.strategy.data_parallel_size=N "
                "--trainer.strategy.tensor_parallel_size=1."
            )
        mesh = self.device_mesh["data_parallel"]
        for block in default_units(self.model):
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def loss(self, input_ids: Tensor) -> Tensor:
        """Mean next-token cross-entropy over the blocks (every position but the last predicts one)."""
        logits = self.model(input_ids=input_ids).logits
        if logits.dtype in (torch.bfloat16, torch.float16):  # reduce in float32 for a stable loss
            logits = logits.float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        input_ids = batch["input_ids"]
        loss = self.loss(input_ids)
        now = time.perf_counter()
        metrics = {"train/loss": loss, "train/perplexity": torch.exp(loss.detach())}
        if self._last_step_time is not None:
            # Host clock only: every rank processes as many tokens per step.
            tokens = input_ids.numel() * self.trainer.world_size
            metrics["train/tokens_per_second"] = tokens / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        self.log_dict(metrics, prog_bar=True, batch_size=len(input_ids))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        input_ids = batch["input_ids"]
        self.val_loss.update(self.loss(input_ids), weight=input_ids[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()  # over every process's tokens
        self.val_loss.reset()
        self.log_dict({"val/loss": loss, "val/perplexity": torch.exp(loss)}, prog_bar=True, sync_dist=False)
        self._last_step_time = None  # validation time is not training throughput

    def configure_callbacks(self) -> list[Callback]:
        """A resumable checkpoint on SIGTERM or Ctrl-C, and exit status 143 after SIGTERM (as ``fit``'s module)."""
        if (trainer := attached_trainer(self)) is not None and not trainer.checkpoint_callbacks:
            return []
        return [PreemptionCheckpoint()]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A local folder by its absolute path: the export may run from another folder.
        tokenizer = str(Path(self.tokenizer).resolve()) if Path(self.tokenizer).is_dir() else self.tokenizer
        checkpoint["lightning_meta"] = {
            "module": "pretraining",
            "hf_config": self.model.config.to_dict(),
            **tokenizer_record(tokenizer),
            "init_from": None if self.init_from is None else str(Path(self.init_from).expanduser().resolve()),
            "initial_provenance": self.initial_provenance,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_tokenizer_record(checkpoint.get("lightning_meta") or {}, self.tokenizer, "The checkpoint")

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMPretraining:
        """Lightning's ``load_from_checkpoint``, for local files only and with ``weights_only=True``. A checkpoint
        whose saved ``trust_remote_code`` is true is refused unless the caller passes ``trust_remote_code=True``:
        the file never decides that its ``init_from`` folder's own code runs."""
        option = "CausalLMPretraining.load_from_checkpoint(..., trust_remote_code=True)"
        saved_hyperparameters(
            load_checkpoint_file(checkpoint_path), f"The checkpoint {checkpoint_path}", given=kwargs, allow=option
        )
        return super().load_from_checkpoint(
            checkpoint_path,
            map_location=map_location,
            hparams_file=hparams_file,
            strict=strict,
            weights_only=True,
            **kwargs,
        )
