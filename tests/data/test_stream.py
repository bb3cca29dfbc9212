"""The stream and evaluation-split rules every datamodule shares (lightning_meta.data.stream)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from lightning_meta.data import stream
from lightning_meta.datamodules.packed_text import _BlockBatchSampler

sys.path.insert(0, str(Path(__file__).parents[1] / "datamodules"))
from test_packed_text import TOKENIZER, write_corpus  # noqa: E402


def test_padded_shares_hold_every_item_once_and_are_equal():
    shares = [stream.rank_share(7, rank, 3, pad=True, what="x", fix="") for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4, stream.PADDING], [2, 5, stream.PADDING]]


def test_unpadded_shares_leave_the_remainder_out_and_are_equal():
    shares = [stream.rank_share(7, rank, 3, pad=False, what="x", fix="") for rank in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]


def test_fewer_items_than_processes_is_refused_with_the_fix():
    message = r"^1 val batches for 2 processes: every process needs at least one\. Raise it\.$"
    with pytest.raises(ValueError, match=message):
        stream.rank_share(1, 0, 2, pad=True, what="val batches", fix="Raise it.")
    with pytest.raises(ValueError, match="0 validation blocks for 1 processes"):
        stream.rank_share(0, 0, 1, pad=False, what="validation blocks", fix="")
    assert stream.rank_share(0, 0, 2, pad=True, what="x", fix="") == []  # none at all: Lightning skips the split


@pytest.mark.parametrize(
    "sampler",
    [
        stream.IndexSampler([1, 3], rank=1, world=2),
        stream.StreamSampler(4, lambda: 10, rank=1, world=2),
        _BlockBatchSampler(40, 4, 1, 2, seed=0, shuffle=False, position=lambda: 0),
    ],
    ids=["index", "stream", "packed blocks"],
)
def test_samplers_are_complete_distributed_samplers_lightning_leaves_in_place(sampler):
    # Lightning wraps any sampler that is not a DistributedSampler in its own under DDP; these were once
    # DistributedSamplers that skipped its __init__ (no num_replicas, rank, epoch, ...).
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.num_samples) == (2, 1, len(sampler))
    sampler.set_epoch(5)  # the epoch is not what orders them
    assert len(list(sampler)) == len(sampler)


def test_the_stream_sampler_starts_where_the_position_says_at_each_epoch():
    position = [0]
    sampler = stream.StreamSampler(3, lambda: position[0])
    assert list(sampler) == [0, 1, 2]
    position[0] = 7
    assert list(sampler) == [7, 8, 9]


def test_resuming_fit_on_changed_data_is_refused_or_with_the_option_warned(tmp_path):
    import lightning as L
    import torch

    from lightning_meta import CausalLMLearner, MetaLearningModule
    from lightning_meta.algorithms import FOMAML
    from lightning_meta.datamodules import LanguageModelingTasksDataModule

    corpus = write_corpus(tmp_path / "corpus")

    def run(max_steps: int, ckpt_path=None, test=False, **options) -> L.Trainer:
        torch.manual_seed(0)
        learner = CausalLMLearner(
            model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32},
            tokenizer=TOKENIZER,
        )
        data = LanguageModelingTasksDataModule(
            tokenizer=TOKENIZER,
            corpus=str(corpus),
            block_size=16,
            shots=1,
            queries=1,
            meta_batch_size=1,
            num_val_tasks=1,
            num_test_tasks=1,
            **options,
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            limit_test_batches=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
        )
        module = MetaLearningModule(learner, FOMAML(inner_lr=0.1))
        if test:
            trainer.test(module, data, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    run(2).save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["LanguageModelingTasksDataModule"]
    assert len(saved["data_fingerprint"]) == 16 and "allow_data_change" not in str(saved)
    assert run(3, tmp_path / "two.ckpt").global_step == 3  # the same data: resumes
    (corpus / "json.py").write_text("# an edit after training started\n" + (corpus / "json.py").read_text())
    message = (
        r"^LanguageModelingTasksDataModule: the checkpoint was trained on other data than this run reads \(data "
        r"fingerprint \w{16}, saved \w{16}\).* --data.init_args.allow_data_change=true\.$"
    )
    with pytest.raises(ValueError, match=message):
        run(3, tmp_path / "two.ckpt")
    with pytest.warns(UserWarning, match="Continuing on this data, as allow_data_change=true asks"):
        assert run(3, tmp_path / "two.ckpt", allow_data_change=True).global_step == 3
    run(0, tmp_path / "two.ckpt", test=True)  # evaluation takes any data


def test_each_datamodule_fingerprints_the_data_it_read(tmp_path):
    import json

    from lightning_meta.datamodules import (
        LanguageModelingTasksDataModule,
        PackedTextDataModule,
        SinusoidDataModule,
        TextClassificationDataModule,
        TextToTextTasksDataModule,
    )

    corpus = write_corpus(tmp_path / "corpus")
    table = tmp_path / "rows.jsonl"
    rows = [
        {
            "task": f"t{task}",
            "input": f"question {task} {n}",
            "output": f"answer {n % 3}",
            "text": f"text {n}",
            "label": f"class {n}",
        }
        for task in range(4)
        for n in range(8)
    ]
    table.write_text("\n".join(json.dumps(row) for row in rows))
    makers = {
        "language modeling": lambda: LanguageModelingTasksDataModule(
            tokenizer=TOKENIZER, corpus=str(corpus), block_size=16, shots=1, queries=1
        ),
        "text to text": lambda: TextToTextTasksDataModule(
            tokenizer=TOKENIZER, dataset=str(table), shots=1, queries=1, val_tasks=["t0"], test_tasks=["t1"]
        ),
        "text classification": lambda: TextClassificationDataModule(
            dataset=str(table), ways=2, shots=1, queries=1, class_split=(0.5, 0.25, 0.25)
        ),
        "packed text": lambda: PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(corpus), block_size=16),
        "packed text, streaming": lambda: PackedTextDataModule(tokenizer=TOKENIZER, corpus=str(table), streaming=True),
    }

    def fingerprints() -> dict[str, str]:
        found = {}
        for name, make in makers.items():
            datamodule = make()
            datamodule.setup("fit")
            found[name] = datamodule.data_fingerprint()
        return found

    before = fingerprints()
    assert fingerprints() == before  # read again: the same
    (corpus / "html.py").write_text("changed = True\n" + (corpus / "html.py").read_text())
    rows[-1]["text"] = rows[-1]["input"] = "an edited row"
    table.write_text("\n".join(json.dumps(row) for row in rows))
    after = fingerprints()
    assert [name for name in makers if after[name] == before[name]] == []
    assert SinusoidDataModule().data_fingerprint() is None  # drawn from its options alone: nothing to record
