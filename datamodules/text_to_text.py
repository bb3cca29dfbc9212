"""Text-to-text tasks for causal LMs: an episode is K support and Q query (input, output) examples of one task."""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.data.episodic import EpisodicDataModule
from lightning_meta.data.stream import data_fingerprint
from lightning_meta.data.tables import (
    is_saved_dataset,
    read_table,
)
from lightning_meta.data.tasks import (
    CEILING,
    CHANCE,
    OUTPUT_REGEX,
    STOP_STRING,
    Episode,
)
from lightning_meta.data.tokenization import load_tokenizer, required_tokenizer
from lightning_meta.datamodules.control_tasks import CONTROL, ControlSettings, ControlTasks
from lightning_meta.datamodules.task_collections import (
    TaskCollection,
    check_max_examples_per_task,
    near_duplicates,
    read_task_collection,
    resolve_task_names,
)
from lightning_meta.datamodules.task_splits import HELD_OUT_SPLITS, few, hold_out, seeded_families
from lightning_meta.datamodules.templates import (
    check_template,
)
from lightning_meta.datamodules.text_encoding import (
    TaskEncoder,
    TextTask,
    encode_tasks,
    example_rows,
    task_chance,
)
from lightning_meta.datamodules.text_tables import TableColumns, tasks_from_folder, tasks_from_table

#: How evaluation episodes write in-context demonstrations (``TextToTextTasksDataModule(demonstrations=...)``).
DEMONSTRATION_LAYOUTS = ("metaicl", "bigbench")


class TextToTextTasksDataModule(EpisodicDataModule):
    """Episodes of text-to-text tasks (classification, QA, summarization, ...) for causal LMs.

    A task is a set of (input, output) examples and a prompt template; an example becomes the
    sequence ``template(input) + " " + output + end token`` (no space after a prompt that ends in whitespace,
    as BIG-bench writes the output right after its output prefix), and the loss covers the output tokens
    and the end token only (``labels`` are ``-100`` on the prompt and the padding). An episode
    draws a family, one of its tasks, and ``shots + queries`` distinct examples of it: the support (what adaptation,
    or MetaICL's demonstrations, see) and the query. Tasks whose table lists ``options`` (a
    classification task's possible outputs) also carry each option written after the query's
    prompt in validation and test episodes, so that evaluation scores them (``accuracy``: each option's
    own tokens, without the end token, as BIG-bench and lm-evaluation-harness score them); the other
    tasks are scored by exact match. Training episodes carry no options: training never reads them.

    Training, validation and test tasks are disjoint; by default whole task *families* are held
    out, so that evaluation measures transfer to new kinds of task. Evaluation episodes are fixed
    by ``seed``; the training stream is resumable and differs across ranks
    (:class:`EpisodicDataModule`).

    Args:
        tokenizer: ``embedded-bpe-4096`` (ships with the package), a local tokenizer folder or ``pkg:NAME/dir``;
            required (the CLI gives the learner's when unset).
        dataset: ``None`` for the built-in offline task gym (:mod:`lightning_meta.datamodules.task_gym`); a
            table (``json``/``jsonl``/``csv``/``parquet`` file, a glob of them, or a ``save_to_disk``
            folder) with one row per example; a folder holding one table per task (the task is
            the file name); or a task collection (:mod:`lightning_meta.datamodules.task_collections`): BIG-bench's
            source archive (``bigbench-1.0.0.tar.gz``, not extracted) or a folder of its JSON tasks, or a
            Natural-Instructions ``tasks`` folder, or either as its hub mirrors ship it (a folder of
            ``tasksource/bigbench`` tasks, ``Muennighoff/natural-instructions`` files or ``save_to_disk`` folders);
            read once and cached. ``control``: the control families
            (:mod:`lightning_meta.datamodules.control_tasks`), a fresh task per episode, drawn with replacement.
        task_column: column naming each row's task (not needed for a folder of one table per task).
        input_column: column holding the input text.
        output_column: column holding the output text, or a list of correct outputs (the first trains;
            exact match accepts any). An input repeated with another output gets it as one more.
        family_column: column naming each task's family, used when the table has it.
        options_column: column listing a row's options (a list of strings, or one string of options
            separated by ``|``), used when the table has it: the row is scored against its own
            options, and its outputs must be among them.
        scores_column: column giving each option's score, a list beside ``options`` (BIG-bench's
            ``target_scores``), used when the table has it: choosing an option earns its score, as
            BIG-bench's ``multiple_choice_grade`` gives partial credit; without it a correct option
            earns 1 and the others 0.
        template: the prompt, with ``{input}`` where the input goes (for tables without a
            ``template_column``); ``{{`` and ``}}`` are literal braces, as in ``str.format``.
        template_column: column holding each row's template, used when the table has it.
        channel: also write each example channel-style (Min et al. 2022, the noisy channel): its output
            first, then its prompt and the end token, the loss on the prompt (every split; what
            ``MetaICL(direction="channel")`` trains on), and in evaluation episodes each option followed by
            the prompt, scored on the prompt's tokens (``accuracy_channel``: log p(input | option)).
        demonstrations: how MetaICL's evaluation writes the support before a query: ``"metaicl"``, each example
            as it trains (its whole prompt, output and end token; MetaICL's layout), or ``"bigbench"``, BIG-bench's
            K-shot layout (``bigbench/api/json_task.py``): the task prefix once, then each example's prompt without
            it and its output, separated by the task's example separator, then the query. A table gives them in
            the columns ``task_prefix`` (text every prompt of the task starts with; default none) and
            ``few_shot_example_separator`` (default ``"\\n"``), as the BIG-bench reader writes them. Training
            keeps MetaICL's layout.
        calibration: evaluation episodes carry each option after the content-free prompt (the template with an
            empty input), for ``accuracy_calibrated`` (``CausalLMLearner(scoring="calibrated")``). Scoring them is
            one more prompt and every option again per example; ``false`` leaves them out, and that figure with them.
        gym_families: the gym's families to load (default: every family available here).
        val_tasks: validation tasks by name (overrides ``val_families``); a task with subtasks stands
            for all of them (BIG-bench's ``NAME`` for ``NAME:SUBTASK``); or a preset's name:
            ``bigbench_lite``, BIG-bench Lite's 24 tasks (those in the data).
        test_tasks: test tasks, given like ``val_tasks`` (overrides ``test_families``).
        val_families: validation task families; by default the gym's held-out families, a seeded
            10% of the families of a table with families, else a seeded 10% of the tasks.
        test_families: test task families, chosen like ``val_families``.
        shots: support examples per episode.
        queries: query examples per episode.
        max_length: tokens per example (prompt, output and end token; longer ones are an error).
        truncate_inputs: shorten the input of an example that is too long instead of raising
            (the output is never shortened).
        skip_long_examples: leave out, instead of raising, the examples that stay longer than
            ``max_length`` (with ``truncate_inputs``: those whose fixed prompt alone leaves no room),
            and the tasks with fewer than ``shots + queries`` examples that fit; both are logged.
        max_examples_per_task: use at most this many examples of each task (the first ones; of a
            task collection, a sample drawn with ``seed``).
        family_keywords: BIG-bench keywords that give a task's family, first match wins (default
            :data:`~lightning_meta.datamodules.bigbench.FAMILY_KEYWORDS`).
        positive_examples: a Natural-Instructions task's positive examples in each prompt.
        drop_held_out_overlap: leave out of training the examples whose input is also a validation or test
            example's (compared lowercased, without punctuation and extra spaces), and the training tasks left with
            fewer than ``shots + queries`` examples. Either way their count is logged, with a warning without it
            (tables and task collections; the gym's split is made without shared inputs).
        control: the control families and their sizes, with ``dataset="control"``.
        replacement: draw each episode's support and queries from its task's examples with replacement (an
            input may repeat, within the support and in a query), as the control families do, instead of
            ``shots + queries`` distinct examples; a task then needs only one example.
        ceiling_column: column giving each task's ceiling (the accuracy a reader of ``shots`` support examples
            can reach at best), used when the table has it: evaluation then reports ``ceiling``, ``chance`` (a
            uniform guess among the options) and ``control_gap`` = (accuracy - chance) / (ceiling - chance).
        others: ``meta_batch_size``, ``batches_per_epoch``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``seed``, ``num_workers``, ``allow_data_change``: see
            :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        dataset: str | None = None,
        task_column: str = "task",
        input_column: str = "input",
        output_column: str = "output",
        family_column: str = "family",
        options_column: str = "options",
        scores_column: str = "scores",
        template: str = "Input: {input}\nOutput:",
        template_column: str = "template",
        channel: bool = False,
        calibration: bool = True,
        demonstrations: Literal["metaicl", "bigbench"] = "metaicl",
        gym_families: list[str] | None = None,
        val_tasks: list[str] | str | None = None,
        test_tasks: list[str] | str | None = None,
        val_families: list[str] | None = None,
        test_families: list[str] | None = None,
        shots: int = 4,
        queries: int = 4,
        max_length: int = 64,
        truncate_inputs: bool = False,
        skip_long_examples: bool = False,
        max_examples_per_task: int | None = None,
        family_keywords: list[str] | None = None,
        positive_examples: int = 2,
        drop_held_out_overlap: bool = False,
        control: ControlSettings | None = None,
        replacement: bool = False,
        ceiling_column: str = "ceiling",
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_val_tasks: int = 32,
        num_test_tasks: int = 64,
        eval_meta_batch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(
            meta_batch_size,
            batches_per_epoch,
            num_val_tasks,
            num_test_tasks,
            eval_meta_batch_size,
            seed,
            num_workers,
            allow_data_change,
        )
        if shots < 1 or queries < 1 or max_length < 4:
            raise ValueError(f"Need shots >= 1, queries >= 1, max_length >= 4; got {shots}, {queries}, {max_length}.")
        check_template(template)
        if demonstrations not in DEMONSTRATION_LAYOUTS:
            raise ValueError(
                f"demonstrations={demonstrations!r} is not a layout: use one of {', '.join(DEMONSTRATION_LAYOUTS)} "
                "(--data.init_args.demonstrations)."
            )
        self.tokenizer = required_tokenizer(tokenizer, type(self).__name__)
        self.dataset = dataset
        self.task_column = task_column
        self.input_column = input_column
        self.output_column = output_column
        self.family_column = family_column
        self.options_column = options_column
        self.scores_column = scores_column
        self.template = template
        self.template_column = template_column
        self.channel = channel
        self.calibration = calibration
        self.demonstrations = demonstrations
        self.gym_families = gym_families
        self.val_tasks = val_tasks
        self.test_tasks = test_tasks
        self.val_families = val_families
        self.test_families = test_families
        self.shots = shots
        self.queries = queries
        self.max_length = max_length
        self.truncate_inputs = truncate_inputs
        self.skip_long_examples = skip_long_examples
        check_max_examples_per_task(max_examples_per_task)  # tables and the gym slice by it too
        self.max_examples_per_task = max_examples_per_task
        self.family_keywords = family_keywords
        self.positive_examples = positive_examples
        self.drop_held_out_overlap = drop_held_out_overlap
        if isinstance(control, dict):  # a checkpoint's hyper-parameters (saved as plain data, below)
            control = ControlSettings(**control)
        self.control = control if control is not None else ControlSettings()
        self.replacement = replacement or dataset == CONTROL  # the control families' ceilings assume it
        self.ceiling_column = ceiling_column
        self.save_hyperparameters(ignore=["allow_data_change"])  # a resume's choice, not carried to the next
        if control is not None:
            # Plain data in the checkpoint: a ControlSettings object would not load with weights_only=True,
            # and `lightning-meta export` (and every reader of the checkpoint) refuses it.
            self.hparams["control"] = asdict(control)

    def prepare_data(self) -> None:
        load_tokenizer(self.tokenizer)

    def setup(self, stage: str) -> None:
        """Read and tokenize the tasks, split them (errors about the data surface here)."""
        if self.dataset == CONTROL:
            self._control  # noqa: B018 (checks the settings)
            return
        self.split_tasks  # noqa: B018 (computes and caches the tasks and the splits)

    @functools.cached_property
    def _control(self) -> ControlTasks:
        return ControlTasks(self.control, self.shots)

    @functools.cached_property
    def _control_encoder(self) -> TaskEncoder:
        return TaskEncoder(
            load_tokenizer(self.tokenizer),
            self.max_length,
            self.truncate_inputs,
            memo=True,
            channel=self.channel,
            calibration=self.calibration,
            demonstrations=self.demonstrations,
        )

    @property
    def _columns(self) -> TableColumns:
        return TableColumns(
            self.task_column,
            self.input_column,
            self.output_column,
            self.family_column,
            self.template_column,
            self.options_column,
            self.ceiling_column,
            self.scores_column,
        )

    @functools.cached_property
    def examples(self) -> dict[str, dict[str, Any]]:
        """Each task's ``family``, ``templates``, ``inputs``, ``outputs`` and ``options`` (text, before tokenizing)."""
        if self.dataset is None:
            return _gym_examples(self.gym_families, self.max_examples_per_task)
        if self.collection is not None:
            return tasks_from_table(
                self.collection.table, self.dataset, self._columns, self.template, self.max_examples_per_task
            )
        path = Path(self.dataset).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            return tasks_from_folder(path, self._columns, self.template, self.max_examples_per_task)
        return tasks_from_table(
            read_table(self.dataset), self.dataset, self._columns, self.template, self.max_examples_per_task
        )

    @functools.cached_property
    def collection(self) -> TaskCollection | None:
        """The BIG-bench or Natural-Instructions collection at ``dataset``; ``None`` for the gym and tables."""
        if self.dataset is None:
            return None
        return read_task_collection(
            self.dataset,
            self.max_examples_per_task,
            self.seed,
            self.family_keywords,
            self.positive_examples,
            min_examples=self.shots + self.queries,
        )

    @functools.cached_property
    def tasks(self) -> dict[str, TextTask]:
        """Every task, tokenized (the gym's once per process and settings: several datamodules share them)."""
        if self.dataset is None:
            families = tuple(self.gym_families) if self.gym_families is not None else None
            tasks = _tokenized_gym(
                self.tokenizer,
                families,
                self.max_length,
                self.truncate_inputs,
                self.max_examples_per_task,
                self.skip_long_examples,
                self.channel,
                self.calibration,
                self.demonstrations,
            )
        else:
            tasks = encode_tasks(
                self.examples,
                self.tokenizer,
                self.max_length,
                self.truncate_inputs,
                self.skip_long_examples,
                self.channel,
                self.calibration,
                self.demonstrations,
            )
        needed = self._examples_needed
        small = {name: len(task) for name, task in tasks.items() if len(task) < needed}
        # A few names, smallest first: a user's table can have thousands of such tasks.
        shown = few([f"{name} ({small[name]})" for name in sorted(small, key=lambda name: (small[name], name))])
        if small and self.skip_long_examples:
            rank_zero_info(
                f"Text-to-text tasks: left out {len(small)} of {len(tasks)} tasks with fewer than shots + queries = "
                f"{needed} examples that fit max_length={self.max_length}: {shown}."
            )
            return {name: task for name, task in tasks.items() if name not in small}
        if small:
            raise ValueError(
                f"{len(small)} of {len(tasks)} tasks have fewer than shots + queries = {needed} distinct examples "
                f"(examples in brackets): {shown}. Lower shots or queries, add examples to those tasks, or leave them "
                "out with --data.init_args.skip_long_examples=true (their count is logged)."
            )
        return tasks

    @property
    def _examples_needed(self) -> int:
        """A task's fewest examples: an episode's ``shots + queries`` distinct ones, or one drawn with replacement."""
        return 1 if self.replacement else self.shots + self.queries

    @functools.cached_property
    def split_tasks(self) -> dict[str, list[str]]:
        """Task names of each split; the three are disjoint, and held-out families have no training task
        (:func:`~lightning_meta.datamodules.task_splits.hold_out`)."""
        families = {name: task.family for name, task in self.tasks.items()}
        named = {
            split: None if names is None else resolve_task_names(names, self.tasks, self.collection, split)
            for split in HELD_OUT_SPLITS
            for names in [getattr(self, f"{split}_tasks")]
        }
        chosen = {split: getattr(self, f"{split}_families") for split in HELD_OUT_SPLITS}
        held_out = hold_out(families, named, chosen, self._default_families, self.seed, self.family_column)
        train = self._without_held_out_copies(held_out.training_tasks(), held_out.excluded)
        if not train:
            raise ValueError("Every task is held out: leave at least one task for training.")
        rank_zero_info(held_out.describe(train))
        return {"train": train, **held_out.tasks}

    def _without_held_out_copies(self, train: list[str], held_out: list[str]) -> list[str]:
        """The training tasks without those a task collection lists as made from a held-out one
        (:func:`~lightning_meta.datamodules.task_collections.near_duplicates`); the training examples whose input is
        a held-out one's are counted, with a warning, or with ``drop_held_out_overlap`` left out."""
        copies = near_duplicates(held_out, train, self.collection)
        if copies:
            rank_zero_info(
                f"Text-to-text tasks: left {len(copies)} tasks out of training, made from held-out ones: "
                + ", ".join(f"{name} (from {source})" for name, source in sorted(copies.items()))
                + "."
            )
            train = [name for name in train if name not in copies]
        if self.dataset is None:  # the gym's split is made without shared inputs (task_gym)
            return train
        held_inputs = {_normalised(text) for name in held_out for text in self.tasks[name].inputs} - {""}
        overlap = {}  # training task -> its rows whose input a held-out task has
        for name in train:
            rows = [row for row, text in enumerate(self.tasks[name].inputs) if _normalised(text) in held_inputs]
            if rows:
                overlap[name] = rows
        if not overlap:
            return train
        count = sum(map(len, overlap.values()))
        shown = sorted(overlap, key=lambda name: (-len(overlap[name]), name))
        where = f"{count} examples of {len(overlap)} training tasks ({few(shown)})"
        if not self.drop_held_out_overlap:
            rank_zero_warn(
                f"Text-to-text tasks: {where} have the input of a validation or test example (compared lowercased, "
                "without punctuation and extra spaces), so evaluation asks questions training saw. Set "
                "drop_held_out_overlap=true to leave them out of training, or hold those tasks out too."
            )
            return train
        tasks = dict(self.tasks)  # the gym's are shared by datamodules: replaced, never changed
        for name, rows in overlap.items():
            tasks[name] = tasks[name].select(sorted(set(range(len(tasks[name]))) - set(rows)))
        needed = self._examples_needed
        small = sorted(name for name in overlap if len(tasks[name]) < needed)
        self.tasks = {name: task for name, task in tasks.items() if name not in small}
        also = f", and {len(small)} tasks left with fewer than {needed} examples: {few(small)}" if small else ""
        rank_zero_info(
            f"Text-to-text tasks: left out of training {where}, whose input a validation or test example has{also}."
        )
        return [name for name in train if name not in small]

    def _default_families(self, split: str, known_families: list[str], available: list[str]) -> list[str] | None:
        """The gym's held-out families; for a table, :func:`~lightning_meta.datamodules.task_splits.seeded_families`."""
        if self.dataset is None:
            from lightning_meta.datamodules.task_gym import DEFAULT_SPLIT

            return [family for family in DEFAULT_SPLIT[split] if family in known_families]
        return seeded_families(known_families, available, split, self.seed)

    @functools.cached_property
    def _families_of_split(self) -> dict[str, list[list[str]]]:
        """Each split's tasks grouped by family (a task without a family is a family of its own)."""
        grouped: dict[str, list[list[str]]] = {}
        for split, names in self.split_tasks.items():
            families: dict[str, list[str]] = {}
            for name in names:
                families.setdefault(self.tasks[name].family or f"task:{name}", []).append(name)
            grouped[split] = [families[family] for family in sorted(families)]
        return grouped

    @functools.cached_property
    def _options_of_split(self) -> dict[str, int]:
        """The most options of a split's tasks: its episodes' choice rows are padded to it. When any task lists
        options, every evaluation episode carries choice rows (at least one), so that every split reports accuracy;
        training episodes carry none (:meth:`sample_episode`)."""
        listed = int(any(task.answer is not None for task in self.tasks.values()))
        return {
            split: max(
                [
                    listed,
                    *(
                        self.tasks[name].choice_input_ids.shape[1]
                        for name in names
                        if self.tasks[name].answer is not None
                    ),
                ]
            )
            for split, names in self.split_tasks.items()
        }

    def data_fingerprint(self) -> str | None:
        """Of every task's tokenized examples and the split; ``None`` for the control tasks (drawn from the
        options alone)."""
        return None if self.dataset == CONTROL else data_fingerprint(self.split_tasks, self.tasks)

    def sample_episode(self, generator: torch.Generator, split: str) -> Episode:
        if self.dataset == CONTROL:
            drawn = self._control.draw(generator, split)
            task, options = self._control_encoder.encode(drawn.name, drawn.as_examples()), self._control.options
        else:
            # A family first, then one of its tasks: families with many tasks do not crowd out the others.
            families = self._families_of_split[split]
            names = families[int(torch.randint(len(families), (), generator=generator))]
            task = self.tasks[names[int(torch.randint(len(names), (), generator=generator))]]
            options = self._options_of_split[split]
        if split == "train":
            # Training reads no options: a BIG-bench batch would otherwise carry (and data-check) ~100 rows per
            # example at every step.
            options = 0
        needed = self.shots + self.queries
        if self.replacement:
            chosen = torch.randint(len(task), (needed,), generator=generator)
        else:
            chosen = torch.randperm(len(task), generator=generator)[:needed]
        support, query = (
            example_rows(task, rows, options, self.channel, self.calibration, demonstrations=split != "train")
            for rows in (chosen[: self.shots], chosen[self.shots :])
        )
        metadata = {"task": task.name, "family": task.family or "", "example_ids": chosen}
        if split != "train":  # how evaluation cuts generated outputs (every episode has both: they stack)
            metadata |= {STOP_STRING: task.stop_string or "", OUTPUT_REGEX: task.output_regex or ""}
        if task.ceiling is not None:
            ceiling = torch.tensor(task.ceiling, dtype=torch.float64)
            metadata |= {CEILING: ceiling, CHANCE: task_chance(task, chosen[self.shots :])}
        return Episode(support=support, query=query, shots=self.shots, metadata=metadata)


@functools.lru_cache(maxsize=4)
def _tokenized_gym(
    tokenizer: str,
    families: tuple[str, ...] | None,
    max_length: int,
    truncate_inputs: bool,
    limit: int | None,
    skip_long_examples: bool,
    channel: bool = False,
    calibration: bool = True,
    demonstrations: str = "metaicl",
) -> dict[str, TextTask]:
    examples = _gym_examples(list(families) if families is not None else None, limit)
    return encode_tasks(
        examples, tokenizer, max_length, truncate_inputs, skip_long_examples, channel, calibration, demonstrations
    )


def _gym_examples(families: list[str] | None, limit: int | None) -> dict[str, dict[str, Any]]:
    from lightning_meta.datamodules.task_gym import gym_tasks

    return {
        task.name: {
            "family": task.family,
            "templates": [task.template] * len(task.examples[:limit]),
            "inputs": [text for text, _ in task.examples[:limit]],
            "outputs": [[output] for _, output in task.examples[:limit]],
            "options": [task.options] * len(task.examples[:limit]),
        }
        for task in gym_tasks(families)
    }


def _normalised(text: str) -> str:
    """``text`` lowercased, without punctuation, with one space for each run of whitespace: near-copies match."""
    return " ".join(text.lower().translate(_punctuation()).split())


@functools.cache
def _punctuation() -> dict[int, None]:
    """A translation table deleting Unicode punctuation (categories P*). Symbols stay: "2+2" and "22" differ."""
    return {code: None for code in range(0x10000) if unicodedata.category(chr(code)).startswith("P")}
