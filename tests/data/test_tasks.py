"""Task batches: shape checks, empty splits, episodes, and non-finite inner losses."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML, Reptile
from lightning_meta.data.tasks import TaskBatch
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
