"""Batches are padded to their longest real sequence (rounded up to a multiple of 8), never to max_length."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_meta.data.episodic import task_generator
from lightning_meta.data.tasks import (
    ANSWER,
    CHOICE_ATTENTION_MASK,
    CHOICE_FIELDS,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    CORRECT,
    IGNORE_INDEX,
    TaskBatch,
    padded,
    padded_length,
    without_padding,
)
from lightning_meta.datamodules import TextToTextTasksDataModule

TOKENIZER = "embedded-bpe-512"
MAX_LENGTH = 64


def right_padded(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width) < torch.tensor(lengths)[:, None]).long()


def test_without_padding_cuts_each_mask_group_to_its_longest_row_rounded_up_to_8():
    mask = torch.stack([right_padded([3, 11], 32), right_padded([5, 2], 32)])  # (episodes, examples, tokens)
    choice_mask = right_padded([4, 2, 0, 6, 17, 0], 32).view(2, 1, 3, 32)  # (episodes, examples, options, tokens)
    split = {
        "input_ids": torch.randint(1, 9, (2, 2, 32)) * mask,
        "attention_mask": mask,
        "labels": torch.full((2, 2, 32), IGNORE_INDEX),
        "class": torch.tensor([[0, 1], [1, 0]]),  # (episodes, examples): not token-aligned, kept whole
        CHOICE_INPUT_IDS: choice_mask * 7,
        CHOICE_ATTENTION_MASK: choice_mask,
        CHOICE_LABELS: choice_mask * 7,
    }
    trimmed = without_padding(split)
    assert {name: tuple(tensor.shape) for name, tensor in trimmed.items()} == {
        "input_ids": (2, 2, 16),
        "attention_mask": (2, 2, 16),
        "labels": (2, 2, 16),
        "class": (2, 2),
        CHOICE_INPUT_IDS: (2, 1, 3, 24),
        CHOICE_ATTENTION_MASK: (2, 1, 3, 24),
        CHOICE_LABELS: (2, 1, 3, 24),
    }
    for name, tensor in trimmed.items():
        assert torch.equal(tensor, split[name][..., : tensor.shape[-1]]), name
    # Never longer than the input, and at least one position.
    assert without_padding({"attention_mask": right_padded([30], 30)})["attention_mask"].shape == (1, 30)
    assert without_padding({"attention_mask": right_padded([0], 30)})["attention_mask"].shape == (1, 8)
    assert [padded_length(n) for n in (0, 1, 8, 9, 17)] == [8, 8, 8, 16, 24]


def test_without_padding_cuts_the_token_fields_by_name_not_by_shape():
    """``correct`` (episodes, examples, options) is shaped like the mask when there are as many options as positions."""
    mask = right_padded([3, 2], 16)[None]
    choice_mask = right_padded([5] * 16, 16).view(1, 1, 16, 16).expand(1, 2, 16, 16)
    correct = torch.zeros(1, 2, 16, dtype=torch.bool)
    correct[0, :, 12] = True  # the right option is past the cut
    split = {
        "input_ids": mask * 7,
        "attention_mask": mask,
        "labels": mask.masked_fill(mask == 0, IGNORE_INDEX),
        CHOICE_INPUT_IDS: choice_mask * 7,
        CHOICE_ATTENTION_MASK: choice_mask,
        CHOICE_LABELS: (choice_mask * 7).masked_fill(choice_mask == 0, IGNORE_INDEX),
        CORRECT: correct,
        ANSWER: torch.tensor([[12, 12]]),
    }
    trimmed = without_padding(split)
    assert trimmed["attention_mask"].shape == trimmed["labels"].shape == (1, 2, 8)
    assert trimmed[CHOICE_LABELS].shape == (1, 2, 16, 8)
    assert torch.equal(trimmed[CORRECT], correct) and torch.equal(trimmed[ANSWER], split[ANSWER])
    # Padded back, the batch is the one it was cut from.
    widths = {"attention_mask": 16, CHOICE_ATTENTION_MASK: 16}
    assert all(torch.equal(tensor, split[name]) for name, tensor in padded(trimmed, widths).items())


def test_padding_fraction_counts_the_padded_positions_of_both_splits():
    support = {"attention_mask": right_padded([3, 8], 8)[None]}
    query = {"attention_mask": right_padded([2, 1], 8)[None]}
    batch = TaskBatch(support, query)
    assert batch.padding_fraction() == 1 - 14 / 32
    assert TaskBatch({"x": torch.ones(1, 2, 1)}, {"x": torch.ones(1, 2, 1)}).padding_fraction() is None


def write_tasks(folder: Path) -> Path:
    """Two families of tasks whose inputs are 1 to 12 words long; even tasks have options."""
    rows = []
    for task in range(4):
        for example in range(10):
            words = " ".join(["word"] * (1 + (example * 5 + task) % 12))
            output = ("yes" if example % 2 else "no") if task % 2 == 0 else f"out {example}"
            options = ["no", "yes"] if task % 2 == 0 else None
            rows.append(
                {
                    "task": f"t{task}",
                    "family": f"f{task % 2}",
                    "input": f"{words} {example}",
                    "output": output,
                    "options": options,
                }
            )
    path = folder / "tasks.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def datamodule(path: Path) -> TextToTextTasksDataModule:
    module = TextToTextTasksDataModule(
        tokenizer=TOKENIZER,
        dataset=str(path),
        shots=3,
        queries=2,
        max_length=MAX_LENGTH,
        meta_batch_size=3,
        val_tasks=["t0"],
        test_tasks=["t1"],
        num_val_tasks=4,
        num_test_tasks=4,
    )
    module.setup("fit")
    return module


def test_text_batches_hold_the_episodes_real_tokens_at_the_batch_s_longest_length(tmp_path):
    dm = datamodule(write_tasks(tmp_path))
    # The fixed validation episodes, drawn as the datamodule draws them, stacked at max_length.
    generator = task_generator(dm.seed, "val")
    full = TaskBatch.stack([dm.sample_episode(generator, "val") for _ in range(dm.eval_meta_batch_size)])
    for name, batch, reference in [("train", dm.train_batch(0), None), ("val", dm.eval_batches("val")[0], full)]:
        assert CHOICE_FIELDS[0] in batch.query or name == "train"
        for split_name in ("support", "query"):
            split = getattr(batch, split_name)
            for mask_name in ("attention_mask", CHOICE_ATTENTION_MASK):
                if mask_name in split:
                    width, longest = split[mask_name].shape[-1], int(split[mask_name].sum(-1).max())
                    assert width % 8 == 0 and width - 8 < longest <= width < MAX_LENGTH, (name, mask_name)
            if reference is None:
                continue
            for field, tensor in getattr(reference, split_name).items():
                cut = split[field]
                assert torch.equal(tensor[..., : cut.shape[-1]], cut), field
                rest = tensor[..., cut.shape[-1] :]
                if field.endswith("attention_mask"):
                    assert not rest.any(), field
                if field.endswith("labels"):
                    assert (rest == IGNORE_INDEX).all(), field
