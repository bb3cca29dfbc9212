"""The held-out split rule on its own (``hold_out``): by name, by family, drawn; its errors name the option."""

from __future__ import annotations

import pytest

from lightning_meta.datamodules.task_splits import hold_out, seeded_families, shuffled_names

FAMILIES = {f"t{i}": f"f{i % 3}" for i in range(9)}  # three families of three tasks


def no_default(split: str, known: list[str], available: list[str]) -> None:
    return None


def test_named_tasks_then_a_family_that_cedes_them():
    held = hold_out(FAMILIES, {"val": ["t1"], "test": None}, {"val": None, "test": ["f1"]}, no_default, seed=0)
    assert held.tasks == {"val": ["t1"], "test": ["t4", "t7"]}  # t1 is f1's too, but val names it
    assert held.ceded == {"test": 1} and held.naming == ["val"] and held.drawn == []
    assert held.training_tasks() == ["t0", "t2", "t3", "t5", "t6", "t8"]  # no f1 task trains
    line = held.describe(held.training_tasks())
    assert line == (
        "Text-to-text tasks: 6 training tasks; validation 1 task held out by task (t1); test 2 tasks held out by "
        "family (families f1); 1 more of their tasks are named by val_tasks."
    )


def test_without_families_the_splits_are_a_seeded_draw_of_a_tenth():
    flat = {f"t{i}": None for i in range(20)}
    held = hold_out(flat, {"val": None, "test": None}, {"val": None, "test": None}, no_default, seed=3)
    order = shuffled_names(sorted(flat), 3)
    assert held.tasks == {"val": sorted(order[:2]), "test": sorted(order[2:4])}
    assert held.drawn == ["val", "test"]
    assert len(held.training_tasks()) == 16
    assert "Held out by task, not by family, for val and test: the data has no 'family' column" in held.describe(
        held.training_tasks()
    )


def test_default_families_from_three_families_on():
    default = lambda split, known, available: seeded_families(known, available, split, seed=0)  # noqa: E731
    held = hold_out(FAMILIES, {"val": None, "test": None}, {"val": None, "test": None}, default, seed=0)
    assert len(held.families["val"]) == len(held.families["test"]) == 1
    assert held.families["val"] != held.families["test"]
    assert seeded_families(["a", "b"], ["a", "b"], "val", seed=0) is None  # two families: drawn by task


@pytest.mark.parametrize(
    ("named", "families", "message"),
    [
        ({"val": ["t1", "nope"], "test": None}, {"val": None, "test": None}, "Unknown tasks ['nope'] in val_tasks"),
        ({"val": None, "test": None}, {"val": ["f9"], "test": None}, "Unknown families ['f9'] in val_families"),
        ({"val": ["t1"], "test": ["t1"]}, {"val": None, "test": None}, "Tasks ['t1'] are in both"),
        ({"val": [], "test": ["t1"]}, {"val": None, "test": None}, "The val split has no task: name some with"),
        (
            {"val": None, "test": None},
            {"val": ["f0", "f1"], "test": ["f2"]},
            "val_families and test_families take every one of the 9 tasks",
        ),
    ],
)
def test_errors_name_the_option(named, families, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hold_out(FAMILIES, named, families, no_default, seed=0)
