"""Which tasks validate and test, and which train: held out by name, by family or by a seeded draw, the splits
disjoint and a held-out family never trained on. The one rule of :attr:`TextToTextTasksDataModule.split_tasks`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: The held-out splits, in the order they are reported.
HELD_OUT_SPLITS = ("val", "test")
#: ``(split, known families, families with a task no split names) -> families`` held out by default, or ``None``.
DefaultFamilies = Callable[[str, list[str], list[str]], "list[str] | None"]


@dataclass
class HeldOut:
    """Each held-out split's tasks, and how they were chosen."""

    tasks: dict[str, list[str]]  #: split -> its task names, sorted
    task_families: dict[str, str | None]  #: every task -> its family (what the split was made from)
    family_column: str = "family"  #: the table's column of families, named in the report
    families: dict[str, list[str]] = field(default_factory=dict)  #: split -> the families it holds out whole
    ceded: dict[str, int] = field(default_factory=dict)  #: family split -> its families' tasks another split names
    naming: list[str] = field(default_factory=list)  #: the splits given by task name
    drawn: list[str] = field(default_factory=list)  #: the splits drawn by task (too few families)
    known_families: list[str] = field(default_factory=list)

    @property
    def excluded(self) -> list[str]:
        """Every held-out task, sorted."""
        return sorted({name for names in self.tasks.values() for name in names})

    def training_tasks(self) -> list[str]:
        """The tasks neither held out nor of a held-out family, sorted."""
        excluded = set(self.excluded)
        excluded_families = {family for chosen in self.families.values() for family in chosen}
        families = self.task_families
        return [name for name in sorted(families) if name not in excluded and families[name] not in excluded_families]

    def describe(self, train: list[str]) -> str:
        """The one-line report of the split with ``train`` training: each split's size, and how it was held out."""
        families, family_column = self.task_families, self.family_column
        trained_families = {families[name] for name in train}
        described = {
            split: _describe_split(self.tasks[split], self.families.get(split), families, trained_families)
            + (
                f"; {self.ceded[split]} more of their tasks are named by {'/'.join(self.naming)}_tasks"
                if self.ceded.get(split)
                else ""
            )
            for split in HELD_OUT_SPLITS
        }
        why = ""
        if self.drawn:
            have = f"{len(self.known_families)} families" if self.known_families else f"no {family_column!r} column"
            why = (
                f" Held out by task, not by family, for {' and '.join(self.drawn)}: the data has {have} (whole "
                f"families are held out by default from 3 families on); name them with {self.drawn[0]}_families or "
                f"{self.drawn[0]}_tasks."
            )
        return (
            f"Text-to-text tasks: {len(train)} training tasks; validation {described['val']}; test "
            f"{described['test']}.{why}"
        )


def hold_out(
    families: dict[str, str | None],
    named_tasks: dict[str, list[str] | None],
    named_families: dict[str, list[str] | None],
    default_families: DefaultFamilies,
    seed: int,
    family_column: str = "family",
) -> HeldOut:
    """The held-out splits of the tasks ``families`` lists (task -> its family or ``None``).

    A split given by task name (``named_tasks[split]``, names already resolved) holds exactly those; one given by
    family (``named_families[split]``, else ``default_families``) holds every task of its families that no split
    names; a split neither gives is a seeded 10% draw of the tasks left. Raises naming the option to change when a
    name is unknown, when a split is empty or shares a task with another, or when nothing is left to train on.
    """
    tasks = sorted(families)
    known_families = sorted({family for family in families.values() if family is not None})
    held: dict[str, list[str]] = {}
    result = HeldOut(tasks=held, task_families=families, family_column=family_column, known_families=known_families)
    named: set[str] = set()  # tasks a split names: a family split holds out only the others
    for split in sorted(HELD_OUT_SPLITS, key=lambda split: named_tasks[split] is None):  # named first
        names, chosen = named_tasks[split], named_families[split]
        if names is not None:
            unknown = sorted(set(names) - set(families))
            if unknown:
                raise ValueError(f"Unknown tasks {unknown} in {split}_tasks; tasks: {tasks}.")
            held[split] = sorted(names)
            named |= set(names)
            result.naming.append(split)
            continue
        if chosen is None:
            available = sorted({families[name] for name in tasks if name not in named} - {None})
            chosen = default_families(split, known_families, available)
        if chosen is None:
            continue
        unknown = sorted(set(chosen) - set(known_families))
        if unknown:
            raise ValueError(
                f"Unknown families {unknown} in {split}_families; families: {known_families}"
                + ("" if known_families else f" (the data has no {family_column!r} column)")
                + "."
            )
        members = [name for name in tasks if families[name] in set(chosen)]
        held[split] = sorted(name for name in members if name not in named)
        result.families[split] = sorted(chosen)
        result.ceded[split] = len(members) - len(held[split])
    result.naming.sort()
    if set(result.excluded) == set(tasks):
        given = [
            f"{split}_{kind}"
            for split in HELD_OUT_SPLITS
            for kind, chosen in (("tasks", named_tasks), ("families", named_families))
            if chosen[split] is not None
        ]
        among = f"families: {', '.join(known_families)}" if known_families else "tasks"
        raise ValueError(
            f"{' and '.join(given) or 'The held-out splits'} take every one of the {len(tasks)} tasks: no training "
            f"task is left. Hold out fewer ({among}), or add tasks."
        )
    result.drawn = [split for split in HELD_OUT_SPLITS if split not in held]
    if result.drawn:  # too few families: a seeded draw of tasks
        shuffled = shuffled_names(tasks, seed)
        count = max(1, len(tasks) // 10)
        taken = set(result.excluded)
        for split in result.drawn:
            held[split] = sorted([name for name in shuffled if name not in taken][:count])
            taken |= set(held[split])
    overlap = sorted(set(held["val"]) & set(held["test"]))
    if overlap:
        raise ValueError(f"Tasks {overlap} are in both the validation and the test split.")
    for split in HELD_OUT_SPLITS:
        if not held[split]:
            raise ValueError(f"The {split} split has no task: name some with {split}_tasks or {split}_families.")
    return result


def seeded_families(known_families: list[str], available: list[str], split: str, seed: int) -> list[str] | None:
    """A table's default held-out families: from 3 families on, a seeded 10% of the ``available`` ones (the
    validation split's first, the test split's next); else ``None`` (the split is drawn by task)."""
    if len(known_families) < 3 or not available:
        return None
    count = max(1, len(known_families) // 10)
    shuffled = shuffled_names(available, seed)
    return shuffled[:count] if split == "val" else shuffled[count : 2 * count]


def shuffled_names(names: list[str], seed: int) -> list[str]:
    """``names`` in a seeded random order (torch's generator: the same order on every machine)."""
    generator = torch.Generator().manual_seed(seed)
    return [names[i] for i in torch.randperm(len(names), generator=generator)]


def few(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names``, and ``...`` when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _describe_split(
    names: list[str], held_families: list[str] | None, families: dict[str, str | None], trained: set[str | None]
) -> str:
    """``2 tasks held out by family (families f1)`` or ``1 task held out by task (t4; its family f1 also trains)``."""
    count = f"{len(names)} task{'s' * (len(names) != 1)}"
    if held_families is not None:
        return f"{count} held out by family (families {', '.join(held_families)})"
    shown = few(names)
    shared = sorted({families[name] for name in names if families[name] is not None} & trained)
    if not shared:
        return f"{count} held out by task ({shown})"
    which = f"its family {shared[0]} trains" if len(shared) == 1 else f"their families {', '.join(shared)} train"
    return f"{count} held out by task ({shown}; {which} too)"
