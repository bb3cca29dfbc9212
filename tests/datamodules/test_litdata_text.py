"""LitData corpora for pretraining: the prepared blocks stream back unchanged, a mid-epoch resume continues the
uninterrupted run's batches (one process and two), and the corpus's misuses get one-line errors."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("litdata", reason='LitData corpora need the [stream] extra: pip install -e ".[stream]"')

from lightning_meta.datamodules import LitDataTextDataModule, PackedTextDataModule  # noqa: E402
from lightning_meta.datamodules.litdata_text import CORPUS_FILE, prepare_litdata_corpus  # noqa: E402
from lightning_meta.handoff.pretraining import CausalLMPretraining  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "handoff"))
from test_export import TINY, quiet_trainer  # noqa: E402
from test_packed_text import write_corpus  # noqa: E402

TOKENIZER = "embedded-bpe-4096"  # the tiny model's (CausalLMPretraining's default for model_config)
WORKER = Path(__file__).parents[1] / "workers" / "litdata_worker.py"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """A text folder and its LitData corpus (blocks of 16 tokens, chunks of 4 blocks)."""
    root = tmp_path_factory.mktemp("litdata")
    text = write_corpus(root / "text")
    return text, prepare_litdata_corpus(
        str(root / "corpus"),
        TOKENIZER,
        str(text),
        block_size=16,
        blocks_per_chunk=4,
        val_fraction=0.1,
        start_method="fork",
    )


def streamed(data: LitDataTextDataModule, split: str = "train") -> torch.Tensor:
    data.setup("fit")
    loader = data.train_dataloader() if split == "train" else data.val_dataloader()
    return torch.cat([batch["input_ids"] for batch in loader])


@pytest.mark.xdist_group("test_litdata_text.prepared")
def test_the_prepared_blocks_stream_back_unchanged(prepared):
    text, corpus = prepared
    packed = PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(text), block_size=16, batch_size=1, val_fraction=0.1)
    data = LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16, batch_size=2, shuffle=False)
    train = streamed(data)
    whole = len(packed.blocks["train"]) // 2 * 2  # drop_last: whole batches only
    assert train.dtype == torch.long and torch.equal(train, packed.blocks["train"][:whole])
    assert torch.equal(streamed(data, "val"), packed.blocks["val"][: len(packed.blocks["val"]) // 2 * 2])
    # Blocks of 8 read the same tokens (8 divides the chunks of 64), cut in two.
    halves = LitDataTextDataModule(
        str(corpus / "train"), tokenizer=TOKENIZER, block_size=8, batch_size=2, shuffle=False
    )
    assert torch.equal(streamed(halves).reshape(-1)[: whole * 16], packed.blocks["train"][:whole].reshape(-1))
    shuffled = streamed(LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16, batch_size=2))
    every_block = set(map(tuple, packed.blocks["train"].tolist()))
    assert not torch.equal(shuffled, train) and len(shuffled) == whole
    assert set(map(tuple, shuffled.tolist())) <= every_block
    assert json.loads((corpus / CORPUS_FILE).read_text())["block_size"] == 16


@pytest.mark.xdist_group("test_litdata_text.prepared")
def test_the_saved_position_is_the_next_batch_the_loop_uses_not_the_next_one_fetched(prepared):
    _, corpus = prepared
    data = LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16, batch_size=4, seed=5)
    data.setup("fit")
    order = [batch["input_ids"].tolist() for batch in data.train_dataloader()]
    loader = data.train_dataloader()
    loader._position = lambda: 1  # Lightning has fetched batch 1 ahead, and used batch 0 only
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    assert state["batch"] == 1 and state["litdata"]["num_samples_yielded"] == 4  # one batch of 4 blocks
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    assert [batch["input_ids"].tolist() for batch in resumed] == order[1:]


class RecordBatches(L.Callback):
    def __init__(self) -> None:
        self.batches: dict[int, list] = {}
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches[trainer.global_step] = batch["input_ids"].tolist()
        self.losses[trainer.global_step] = float(outputs["loss"])


@pytest.mark.xdist_group("test_litdata_text.prepared")
def test_a_mid_epoch_resume_continues_the_uninterrupted_batches(prepared, tmp_path):
    _, corpus = prepared

    def run(root: Path, ckpt_path: Path | None = None) -> RecordBatches:
        L.seed_everything(0, verbose=False)
        module = CausalLMPretraining(model_config=dict(TINY), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
        data = LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16, batch_size=16, seed=3)
        record = RecordBatches()
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
        trainer = quiet_trainer(
            root, max_steps=steps, callbacks=[record, every], enable_checkpointing=True, limit_val_batches=0
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return record

    per_epoch = len(
        LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16, batch_size=16).train_dataloader()
    )
    steps = per_epoch + 6  # the run crosses into a second (reshuffled) epoch
    full = run(tmp_path / "full")
    assert 5 < per_epoch and len(full.batches) == steps
    for step in (5, 5 * (per_epoch // 5 + 1)):  # inside epoch 0, inside epoch 1
        resumed = run(tmp_path / f"from{step}", tmp_path / "ckpt" / f"step={step}.ckpt")
        assert resumed.batches == {k: v for k, v in full.batches.items() if k > step}, step
        assert resumed.losses == {k: v for k, v in full.losses.items() if k > step}, step


@pytest.mark.slow
@pytest.mark.xdist_group("test_litdata_text.prepared")
def test_two_processes_read_disjoint_blocks_and_resume_mid_epoch(prepared, tmp_path):
    _, corpus = prepared
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(WORKER), str(corpus), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    full = {rank: json.loads((tmp_path / f"full-rank{rank}.json").read_text()) for rank in (0, 1)}
    resumed = {rank: json.loads((tmp_path / f"resumed-rank{rank}.json").read_text()) for rank in (0, 1)}
    blocks = {rank: {tuple(block) for batch in full[rank].values() for block in batch} for rank in (0, 1)}
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]  # LitData deals each block to one rank
    for rank in (0, 1):
        assert resumed[rank] == {step: batch for step, batch in full[rank].items() if int(step) > 3}


@pytest.mark.xdist_group("test_litdata_text.prepared")
def test_misused_corpora_get_one_line_errors(prepared, tmp_path):
    text, corpus = prepared

    def error(**options) -> str:
        options = {"tokenizer": TOKENIZER, "block_size": 16} | options
        with pytest.raises(ValueError) as raised:
            LitDataTextDataModule(**options).setup("fit")
        assert "\n" not in str(raised.value)
        return str(raised.value)

    assert "holds no index.json: it is not a litdata.optimize output" in error(corpus=str(text))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LitDataTextDataModule(str(tmp_path / "nowhere"), tokenizer=TOKENIZER).setup("fit")
    assert "block_size=24 does not divide the 64 tokens of each chunk" in error(corpus=str(corpus), block_size=24)
    assert "was trained with tokenizer" in error(corpus=str(corpus), tokenizer="embedded-bpe-512")
    with pytest.raises(FileExistsError, match="exists: give a new folder"):
        prepare_litdata_corpus(str(corpus), TOKENIZER, str(text))
    data = LitDataTextDataModule(str(corpus), tokenizer=TOKENIZER, block_size=16)
    with pytest.raises(ValueError, match="blocks of 32 tokens, this run reads blocks of 16"):
        data.load_state_dict({"block_size": 32})


def test_without_litdata_the_error_names_the_extra(prepared, monkeypatch):
    monkeypatch.setitem(sys.modules, "litdata", None)  # as if not installed
    data = LitDataTextDataModule(str(prepared[1]), tokenizer=TOKENIZER, block_size=16)
    with pytest.raises(ModuleNotFoundError, match=r"need litdata, an optional dependency: .*lightning-meta\[stream\]"):
        data.train_dataloader()


def test_the_readme_prepare_command_writes_the_corpus_the_config_reads(tmp_path, monkeypatch):
    from readme_commands import readme_commands

    from lightning_meta.datamodules.litdata_text import main

    prepare = ("python", "-m", "lightning_meta.datamodules.litdata_text")
    (command,) = [command for command in readme_commands() if command.argv[:3] == prepare]
    monkeypatch.chdir(tmp_path)
    main([*command.argv[3:], "--max_tokens_per_domain", "1000"])  # the last value given wins: a smaller corpus
    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "pretrain_litdata_tiny.yaml").read_text())
    data = LitDataTextDataModule(**config["data"]["init_args"], tokenizer=config["model"]["tokenizer"])
    data.setup("fit")
    assert data.folders == {"train": "data/litdata_corpus/train", "val": "data/litdata_corpus/val"}
