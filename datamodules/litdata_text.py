"""Pretraining text as a LitData corpus: token blocks written by ``litdata.optimize``, streamed back.

:func:`prepare_litdata_corpus` (``python -m lightning_meta.datamodules.litdata_text``) tokenizes text
as :class:`~lightning_meta.datamodules.PackedTextDataModule` does (the embedded corpus without the
meta-learning tasks' held-out domains, a folder of text files or a table; documents joined by EOS,
each domain's end held out) and writes ``train/`` and ``val/`` with ``litdata.optimize`` in chunks of
whole blocks. :class:`LitDataTextDataModule` reads such a folder, or any folder or object-storage URL
(``s3://``, ``gs://``, ...) that ``litdata.optimize`` wrote with ``TokensLoader`` (litgpt's
layout), through ``StreamingDataset`` / ``StreamingDataLoader``: each process streams its own share
of the chunks (LitData splits them by rank and worker), and the loader's position is saved in
Lightning checkpoints, so a resumed run continues with the uninterrupted run's batches.
LitData is the optional ``[stream]`` extra.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info

from lightning_meta.data import stream
from lightning_meta.data.local_files import write_folder_atomically
from lightning_meta.data.tokenization import (
    check_tokenizer,
    check_tokenizer_record,
    fingerprint_of,
    required_tokenizer,
    tokenizer_record,
)

#: What :func:`prepare_litdata_corpus` records beside ``train/`` and ``val/``: the tokenizer and block size.
CORPUS_FILE = "lightning_meta_corpus.json"
#: Loader positions kept per process (Lightning fetches a batch or two ahead of the one it runs).
_KEPT_POSITIONS = 64
_INSTALL = 'pip install "lightning-meta[stream]"'
#: URL schemes LitData reads; anything else is a local path.
_REMOTE = ("s3://", "gs://", "azure://", "hf://", "r2://", "local:")


def _litdata() -> Any:
    try:
        import litdata
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("litdata"):
            raise
        raise ModuleNotFoundError(
            f"LitData corpora need litdata, an optional dependency: {_INSTALL}.", name="litdata"
        ) from None
    return litdata


def _is_remote(path: str) -> bool:
    return path.startswith(_REMOTE)


def _blocks_of(tokens: torch.Tensor) -> Iterator[torch.Tensor]:
    """``litdata.optimize``'s function: each block (a row) as one item of int32 token ids."""
    yield from tokens.to(torch.int32)


def prepare_litdata_corpus(
    output_dir: str,
    tokenizer: str = "embedded-bpe-4096",
    corpus: str | None = None,
    text_column: str = "text",
    domain_column: str | None = None,
    domains: list[str] | None = None,
    val_fraction: float = 0.05,
    block_size: int = 128,
    max_tokens_per_domain: int | None = None,
    blocks_per_chunk: int = 1024,
    num_workers: int = 1,
    start_method: str | None = None,
) -> Path:
    """Tokenize a corpus and write it with ``litdata.optimize``: ``output_dir/train``, ``output_dir/val`` (when
    ``val_fraction`` holds out tokens) and :data:`CORPUS_FILE`.

    The corpus options are :class:`~lightning_meta.datamodules.PackedTextDataModule`'s, which tokenizes and cuts
    the blocks. Chunks hold ``blocks_per_chunk`` whole blocks, so any ``block_size`` dividing the prepared one
    reads every token. ``num_workers`` and ``start_method`` are ``litdata.optimize``'s (its workers only write the
    blocks; ``"fork"`` starts them without re-importing). Returns ``output_dir``; an existing one is refused.
    """
    litdata = _litdata()
    from lightning_meta.datamodules.packed_text import PackedTextDataModule

    output = Path(output_dir).expanduser()
    if output.exists():
        raise FileExistsError(f"output_dir={output_dir!r} exists: give a new folder (a prepared corpus is kept).")
    packed = PackedTextDataModule(
        tokenizer=tokenizer,
        corpus=corpus,
        text_column=text_column,
        domain_column=domain_column,
        domains=domains,
        val_fraction=val_fraction,
        block_size=block_size,
        batch_size=1,
        max_tokens_per_domain=max_tokens_per_domain,
    )
    blocks = packed.blocks
    per_input = max(1, blocks_per_chunk)

    def write(folder: Path) -> None:
        for split, split_blocks in blocks.items():
            if not len(split_blocks):
                continue
            # Copies: a slice pickled to optimize's workers would carry the whole tensor's storage.
            starts = range(0, len(split_blocks), per_input)
            inputs = [split_blocks[start : start + per_input].clone() for start in starts]
            litdata.optimize(
                fn=_blocks_of,
                inputs=inputs,
                output_dir=str(folder / split),
                chunk_size=block_size * per_input,
                item_loader=litdata.TokensLoader(),
                num_workers=num_workers,
                start_method=start_method,
                reorder_files=False,
                verbose=False,
                keep_data_ordered=True,
            )
        record = {
            "tokenizer": tokenizer,
            "tokenizer_fingerprint": fingerprint_of(tokenizer),
            "block_size": block_size,
            "blocks": {split: len(part) for split, part in blocks.items()},
        }
        (folder / CORPUS_FILE).write_text(json.dumps(record, indent=1) + "\n")

    write_folder_atomically(output, write, what="the LitData corpus")
    rank_zero_info(f"LitData corpus written to {output} ({len(blocks['train'])} training blocks of {block_size}).")
    return output


def _collate(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.stack(blocks).long()}


class LitDataTextDataModule(LightningDataModule):
    """Causal-LM batches ``{"input_ids"}`` of ``batch_size`` blocks of ``block_size`` tokens from a LitData corpus.

    Args:
        corpus: a folder written by :func:`prepare_litdata_corpus` (its ``train/`` and ``val/`` are read), or
            one ``litdata.optimize`` output folder or URL of token items (``TokensLoader``), for training.
        val_corpus: another such folder or URL for validation (default: ``corpus/val`` when it exists; none
            otherwise).
        tokenizer: the tokenizer the corpus was tokenized with; checked against the one
            :func:`prepare_litdata_corpus` recorded (``lightning-meta pretrain`` gives the model's when unset).
        block_size: tokens per block; must divide the corpus's chunk size (LitData drops a chunk's last
            partial block).
        batch_size: blocks per batch, per process.
        shuffle: visit the chunks and blocks in a seeded order that changes every epoch.
        seed: seeds that order (the same on every process: LitData deals the chunks out by rank).
        num_workers: ``StreamingDataLoader`` workers.
        cache_dir: where LitData caches chunks of a remote corpus (LitData's default when unset).
        allow_data_change: resume from a checkpoint trained on another corpus (another index), with a warning.
    """

    def __init__(
        self,
        corpus: str,
        val_corpus: str | None = None,
        tokenizer: str | None = None,
        block_size: int = 128,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        if block_size < 2 or batch_size < 1:
            raise ValueError(f"Need block_size >= 2 and batch_size >= 1; got {block_size} and {batch_size}.")
        self.tokenizer = required_tokenizer(tokenizer, type(self).__name__)
        self.corpus, self.val_corpus = corpus, val_corpus
        self.block_size, self.batch_size = block_size, batch_size
        self.shuffle, self.seed, self.num_workers, self.cache_dir = shuffle, seed, num_workers, cache_dir
        self.allow_data_change = allow_data_change
        self.save_hyperparameters(ignore=["allow_data_change"])

    @functools.cached_property
    def folders(self) -> dict[str, str | None]:
        """The ``train`` and ``val`` optimized folders (or URLs), checked."""
        train, val = self.corpus, self.val_corpus
        if not _is_remote(train):
            root = Path(train).expanduser()
            if (root / "train" / "index.json").is_file():
                train = str(root / "train")
                if val is None and (root / "val" / "index.json").is_file():
                    val = str(root / "val")
            self._check_recorded(root)
        folders = {"train": train, "val": val}
        for split, folder in folders.items():
            if folder is not None and not _is_remote(folder):
                self._check_optimized(split, Path(folder).expanduser())
        return folders

    def _check_recorded(self, root: Path) -> None:
        """The tokenizer a prepared corpus was written with (a plain ``litdata.optimize`` folder records none)."""
        record_file = root / CORPUS_FILE
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            check_tokenizer(
                record["tokenizer"],
                record["tokenizer_fingerprint"],
                self.tokenizer,
                f"The LitData corpus {self.corpus}",
            )

    def _check_optimized(self, split: str, folder: Path) -> None:
        option = "corpus" if split == "train" else "val_corpus"
        index = folder / "index.json"
        if not folder.exists():
            raise FileNotFoundError(
                f"{option}={str(folder)!r} does not exist (from {Path.cwd()}): give the folder the prepare command "
                "wrote (python -m lightning_meta.datamodules.litdata_text --output_dir DIR), or a litdata.optimize URL."
            )
        if not index.is_file():
            raise ValueError(
                f"{option}={str(folder)!r} holds no index.json: it is not a litdata.optimize output. Prepare one "
                "with python -m lightning_meta.datamodules.litdata_text --output_dir DIR (or read text with "
                "--data=PackedTextDataModule)."
            )
        config = json.loads(index.read_text()).get("config") or {}
        if config.get("item_loader") != "TokensLoader":
            raise ValueError(
                f"{option}={str(folder)!r} was optimized with item_loader={config.get('item_loader')!r}, not "
                "TokensLoader: it holds other items than token ids. Write it with litdata.optimize(..., "
                "item_loader=TokensLoader()), or prepare it with python -m lightning_meta.datamodules.litdata_text."
            )
        chunk_size = config.get("chunk_size")
        if isinstance(chunk_size, int) and chunk_size % self.block_size:
            divisors = [size for size in range(2, min(chunk_size, 4096) + 1) if chunk_size % size == 0][-3:]
            raise ValueError(
                f"block_size={self.block_size} does not divide the {chunk_size} tokens of each chunk of {option}="
                f"{str(folder)!r}: LitData would drop every chunk's last partial block. Use a block_size dividing "
                f"{chunk_size} (e.g. {divisors}), or prepare the corpus again with this block_size."
            )

    def _dataset(self, split: str) -> Any:
        litdata = _litdata()
        return litdata.StreamingDataset(
            self.folders[split],
            item_loader=litdata.TokensLoader(block_size=self.block_size),
            shuffle=self.shuffle and split == "train",
            seed=self.seed,
            drop_last=True,
            cache_dir=self.cache_dir,
        )

    def setup(self, stage: str) -> None:
        """Check the folders (errors about the data surface here, before any step)."""
        self.folders  # noqa: B018 (checks and caches them)

    def train_dataloader(self) -> Any:
        stream.allow_mid_epoch_resume()
        # LitData gives each worker its own share, so Lightning's caution about a length under workers does
        # not apply; and its token reader copies each block out of a read-only buffer, as torch's warning asks.
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        dataset = self._dataset("train")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"The LitData corpus {self.folders['train']} gives this process {len(dataset)} blocks of "
                f"{self.block_size} tokens, fewer than batch_size={self.batch_size}. Add text, or lower block_size "
                "or batch_size."
            )
        rank_zero_info(f"LitData corpus: {len(dataset)} training blocks of {self.block_size} tokens per process.")
        return _resumable_loader_class()(dataset, self.batch_size, self.num_workers, self._next_batch)

    def val_dataloader(self) -> Any:
        if self.folders["val"] is None:
            return []
        litdata = _litdata()
        # drop_last: every process runs as many batches (under FSDP each forward is a collective).
        return litdata.StreamingDataLoader(
            self._dataset("val"),
            batch_size=self.batch_size,
            collate_fn=_collate,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def _next_batch(self) -> int | None:
        return None if self.trainer is None else stream.next_train_batch(self, 0)

    def data_fingerprint(self) -> str | None:
        """Of the corpus's ``index.json`` files (the chunks' names and sizes); ``None`` for a remote corpus."""
        indexes = []
        for folder in self.folders.values():
            if folder is None:
                continue
            if _is_remote(folder):
                return None
            indexes.append(json.loads((Path(folder).expanduser() / "index.json").read_text()).get("chunks"))
        return stream.data_fingerprint(indexes)

    @functools.cached_property
    def _data_fingerprint(self) -> str | None:
        return self.data_fingerprint()

    def state_dict(self) -> dict[str, Any]:
        """The block size and the fingerprints of the tokenizer and of the corpus (the loader's position is saved
        by Lightning's fit loop, from :class:`_ResumableMixin`'s ``state_dict``)."""
        state: dict[str, Any] = tokenizer_record(self.tokenizer) | {"block_size": self.block_size}
        if self.trainer is not None:
            state |= stream.data_state(self._data_fingerprint)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on another tokenizer's token ids, another block size, or (unless
        ``allow_data_change``) another corpus."""
        check_tokenizer_record(state_dict, self.tokenizer, "The checkpoint's data")
        saved = state_dict.get("block_size", self.block_size)
        if saved != self.block_size:
            raise ValueError(
                f"The checkpoint was trained on blocks of {saved} tokens, this run reads blocks of {self.block_size}: "
                f"its saved position would point into another block layout. Resume with --data.init_args.block_size="
                f"{saved}, or start a new run from the checkpoint's weights with --model.init_from=CKPT (no "
                "--ckpt_path)."
            )
        stream.check_saved_data(self, state_dict, lambda: self._data_fingerprint, self.allow_data_change)


class _ResumableMixin:
    """Over a ``StreamingDataLoader``: ``state_dict`` is the position of the next batch the fit loop *uses*.

    LitData's own counts the batches yielded, and Lightning fetches ahead of the one it runs wherever it
    does not take a loader's length (``stream.next_train_batch``): saved as is, a resumed run would then
    skip a batch. This keeps LitData's state after each batch it yields, by
    the number of batches yielded since the start of training, and gives the one for
    ``position()`` (the fit loop's count of batches consumed; ``None``: every batch yielded).
    Lightning saves it with the fit loop and hands it back to ``load_state_dict`` on resume.
    """

    def __init__(self, dataset: Any, batch_size: int, num_workers: int, position: Callable[[], int | None]) -> None:
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate, drop_last=True)
        self._position = position
        self._yielded = 0
        self._states: dict[int, dict[str, Any] | None] = {0: None}
        self._order: deque[int] = deque([0])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            self._yielded += 1
            self._states[self._yielded] = super().state_dict()
            self._order.append(self._yielded)
            while len(self._order) > _KEPT_POSITIONS:
                self._states.pop(self._order.popleft(), None)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        batch = self._position()
        batch = self._yielded if batch is None else batch
        if batch not in self._states:
            raise RuntimeError(f"The LitData position of batch {batch} was not kept (kept: {sorted(self._states)}).")
        return {"batch": batch, "litdata": self._states[batch]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._yielded = state["batch"]
        self._states, self._order = {self._yielded: state["litdata"]}, deque([self._yielded])
        if state["litdata"] is not None:
            super().load_state_dict(state["litdata"])


@functools.cache
def _resumable_loader_class() -> type:
    """Built on first use, so that importing this module needs no litdata."""
    return type("ResumableStreamingDataLoader", (_ResumableMixin, _litdata().StreamingDataLoader), {})


def main(args: list[str] | None = None) -> None:
    """``python -m lightning_meta.datamodules.litdata_text --output_dir DIR [options]``: :func:`prepare_litdata_corpus`
    (its errors as one line, like the ``lightning-meta`` command's)."""
    from jsonargparse import auto_cli

    from lightning_meta.cli import _run_handled

    _run_handled(lambda: auto_cli(prepare_litdata_corpus, args=args, as_positional=False))


if __name__ == "__main__":
    main()
