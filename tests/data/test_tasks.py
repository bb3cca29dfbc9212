"""Task batches: shape checks, empty splits, episodes, non-finite inner losses, and a split's typed options."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML, Reptile
from lightning_meta.data.tasks import Choices, TaskBatch
from lightning_meta.learners.base import DataError

from conftest import regression_batch


def test_empty_support_is_refused():
    with pytest.raises(ValueError, match="TaskBatch.support is empty .*raise shots/queries"):
        TaskBatch(
            support={"x": torch.zeros(2, 0, 1), "y": torch.zeros(2, 0, 1)},
            query={"x": torch.zeros(2, 3, 1), "y": torch.zeros(2, 3, 1)},
        )


def test_mismatched_fields_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        TaskBatch(
            support={"x": torch.zeros(2, 4, 1), "y": torch.zeros(2, 3, 1)},
            query={"x": torch.zeros(2, 3, 1), "y": torch.zeros(2, 3, 1)},
        )
    with pytest.raises(ValueError, match=r"expected \(meta_batch_size, examples, \.\.\.\)"):
        TaskBatch(support={"x": torch.zeros(4)}, query={"x": torch.zeros(2, 3)})


def test_stack_and_episode_round_trip():
    batch = regression_batch(meta_batch_size=3)
    again = TaskBatch.stack(list(batch.episodes()))
    for split in ("support", "query"):
        for name, tensor in getattr(batch, split).items():
            assert torch.equal(getattr(again, split)[name], tensor)
    assert len(again) == 3 and again.shots == batch.shots


def test_inference_tensors_become_ordinary():
    with torch.inference_mode():
        batch = regression_batch()
    assert batch.support["x"].is_inference()
    with torch.inference_mode(False):
        clone = batch.detached_clone()
    assert not clone.support["x"].is_inference()


@pytest.mark.parametrize("algorithm", [MAML(inner_lr=0.01), Reptile(inner_lr=0.01)])
@pytest.mark.parametrize("split", ["support", "query"])
def test_non_finite_data_names_split_and_episode(mlp_learner, algorithm, split):
    batch = regression_batch()
    getattr(batch, split)["y"][2, 0] = float("nan")
    # Reptile's surrogate never reads the query: the check must not depend on the loss.
    with pytest.raises(DataError, match=rf"Episode 2 of the batch \(1 of 3 episodes\): {split}\['y'\] holds NaN"):
        algorithm.meta_loss(mlp_learner, batch)


def test_splits_join_at_one_width_and_refuse_other_shape_differences():
    from lightning_meta.data.tasks import IGNORE_INDEX, joined

    narrow = {
        "input_ids": torch.ones(2, 8, dtype=torch.long),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "labels": torch.ones(2, 8, dtype=torch.long),
        "x": torch.zeros(2, 3),
    }
    wide = {name: torch.cat([tensor, tensor], -1) for name, tensor in narrow.items() if name != "x"}
    both = joined(narrow, wide)  # a field only one split has ("x") is left out
    assert {name: tuple(tensor.shape) for name, tensor in both.items()} == {name: (4, 16) for name in wide}
    assert not both["attention_mask"][:2, 8:].any() and (both["labels"][:2, 8:] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match=r"field 'x' is shaped \(2, 3\) in one and \(2, 4\) in the other"):
        joined(narrow, wide | {"x": torch.zeros(2, 4)})


@pytest.mark.parametrize(
    ("stop_string", "output_regex", "written", "cut"),
    [
        # BIG-bench's own examples (model_utils.postprocess_output's docstring)
        (".", None, "The apple is on the ground. What is", "The apple is on the ground."),
        (None, r"\d+", "= 42. 7*7 = 49. 7*8 =", "42"),
        ("\n", None, "\nblue", "\nblue"),  # a stop string at the very start cuts nothing, as in BIG-bench
        ("\n", r"[a-z]+", "blue cat\nred", "blue"),  # cut at the stop string (kept), then the first match
        ("\n", r"(\d+) apples", "I see 3 apples and 4 apples\n", "3"),  # one group: its text
        (None, r"\d+", "no digits", ""),  # no match: empty, as BIG-bench
    ],
)
def test_a_generation_rule_cuts_as_bigbench_postprocess_output(stop_string, output_regex, written, cut):
    from lightning_meta.data.tasks import GenerationRule

    assert GenerationRule(stop_string, output_regex).apply(written) == cut


def test_a_generation_rule_is_read_from_episode_metadata_and_refuses_a_regex_of_several_groups():
    from lightning_meta.data.tasks import GenerationRule, generation_rule

    assert generation_rule({"stop_string": "", "output_regex": ""}) is None
    assert generation_rule({}) is None
    assert generation_rule({"stop_string": "\n", "output_regex": ""}) == GenerationRule("\n", None)
    with pytest.raises(ValueError, match=r"output_regex '\(a\)\(b\)' has 2 capturing groups.*\(\?:"):
        GenerationRule(None, "(a)(b)")
    with pytest.raises(ValueError, match=r"output_regex '\(' is not a regular expression"):
        GenerationRule(None, "(")


def _choices(examples: int = 3, options: int = 4, tokens: int = 5) -> Choices:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (examples, options, tokens), generator=generator)
    correct = torch.zeros(examples, options, dtype=torch.bool)
    correct[0, 2] = correct[1, 0] = correct[1, 3] = correct[2, 1] = True
    return Choices(
        ids,
        torch.ones_like(ids),
        ids.clone(),
        correct=correct,
        multiple_choice=torch.tensor([True, True, False]),
        credit=torch.rand(examples, options, generator=generator),
        characters=torch.randint(1, 9, (examples, options), generator=generator).float(),
    )


def test_choices_read_back_what_they_write_and_select_rows():
    from lightning_meta.data.tasks import CORRECT, MULTIPLE_CHOICE

    choices = _choices()
    split = {"input_ids": torch.zeros(3, 5, dtype=torch.long)} | choices.fields()
    assert {MULTIPLE_CHOICE, CORRECT} <= set(split) and "answer" not in split  # the right answers, once
    read = Choices.read(split)
    for field in ("input_ids", "attention_mask", "labels", "correct", "multiple_choice", "credit", "characters"):
        assert torch.equal(getattr(read, field), getattr(choices, field)), field
    rows = read.rows(torch.tensor([2, 0]))
    assert torch.equal(rows.correct, choices.correct[[2, 0]]) and rows.multiple_choice.tolist() == [False, True]
    assert read.scored.tolist() == [True, True, True]
    assert Choices.read({"input_ids": torch.zeros(3, 5)}) is None  # a split without options


def test_an_earlier_versions_answer_index_reads_as_the_same_choices():
    """Splits of earlier versions (and hand-written ones) name the right option by index, -1 for none; without
    credit or characters, a correct option earns 1 and per character reads per token."""
    from lightning_meta.data.tasks import ANSWER, CHOICE_FIELDS, IGNORE_INDEX

    ids = torch.arange(3 * 4 * 5).view(3, 4, 5)
    labels = ids.masked_fill(torch.arange(5) < 2, IGNORE_INDEX)  # 3 labelled tokens per option
    read = Choices.read(
        dict(zip(CHOICE_FIELDS, (ids, torch.ones_like(ids), labels), strict=True)) | {ANSWER: torch.tensor([2, -1, 0])}
    )
    assert read.multiple_choice.tolist() == [True, False, True]
    assert read.correct.tolist() == [[False, False, True, False], [False] * 4, [True, False, False, False]]
    assert torch.equal(read.credit, read.correct.float())
    assert torch.equal(read.characters, torch.full((3, 4), 3.0))


def test_options_without_their_right_answers_are_refused_with_the_fix():
    from lightning_meta.data.tasks import CHOICE_FIELDS, CORRECT

    choices = _choices()
    split = {name: tensor for name, tensor in choices.fields().items() if name in (*CHOICE_FIELDS, CORRECT)}
    with pytest.raises(
        ValueError,
        match=r"not which are right: it has correct of 'multiple_choice' and 'correct'.*"
        r"Choices\(\.\.\.\)\.fields\(\)",
    ):
        Choices.read(split)
