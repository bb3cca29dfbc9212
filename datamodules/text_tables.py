"""Reading a text-to-text table into tasks: a file, a folder of one file per task, or a ``datasets`` table (a task
collection's), by its columns (:class:`TableColumns`); each row's outputs, options, option scores and the task's
ceiling parsed and checked, repeated inputs kept once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.data.tables import (
    TABLE_FORMATS,
    claim_name,
    describe_missing,
    is_missing,
    read_table,
    table_columns,
)
from lightning_meta.datamodules.collection_rows import TASK_FIELDS
from lightning_meta.datamodules.templates import check_template

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class TableColumns:
    """The columns a text-to-text table names its fields in (``TextToTextTasksDataModule``'s ``*_column`` options).
    ``task``, ``input`` and ``output`` are required; the others are read where the table has them."""

    task: str = "task"
    input: str = "input"
    output: str = "output"
    family: str = "family"
    template: str = "template"
    options: str = "options"
    ceiling: str = "ceiling"
    scores: str = "scores"


def tasks_from_table(
    table: Dataset, source: str, columns: TableColumns, default_template: str, max_examples: int | None = None
) -> dict[str, dict[str, Any]]:
    """The tasks of ``table`` (read from ``source``, named in messages): each task's examples (inputs, outputs,
    options, scores, templates: a row's own, else ``default_template``), family, ceiling and BIG-bench task fields,
    read from the ``columns``; an input repeated within a task is kept once, its outputs merged; at most
    ``max_examples`` per task. Missing values, outputs that are not among their row's options and a ceiling at or
    below chance are refused, naming the rows and the fix."""
    required = [columns.task, columns.input, columns.output]
    absent = [column for column in required if column not in table.column_names]
    if absent:
        raise ValueError(
            f"{source} has no column {absent}; its columns are {table.column_names}. Name the columns with "
            "--data.init_args.task_column / input_column / output_column."
        )
    optional = {
        "family": columns.family,
        "template": columns.template,
        "options": columns.options,
        "ceiling": columns.ceiling,
        "scores": columns.scores,
        **{name: name for name in TASK_FIELDS},
    }
    cells = table_columns(
        table, [column for column in dict.fromkeys([*required, *optional.values()]) if column in table.column_names]
    )
    missing = {column: [row for row, value in enumerate(cells[column]) if is_missing(value)] for column in required}
    if missing[columns.input] and columns.options in cells:
        # A row's options can be the whole question (BIG-bench's misconceptions_russian): its input may be empty.
        inputs, listed = cells[columns.input], cells[columns.options]
        missing[columns.input] = [
            row
            for row in missing[columns.input]
            if not isinstance(inputs[row], str) or parse_options(listed[row]) is None
        ]
    if any(missing.values()):
        raise ValueError(
            f"Missing values in {source} (rows counted from 0): {describe_missing(missing, len(table))}. Every "
            "row needs a task, an input (or options) and an output: filter those rows out first."
        )
    values_of = {key: cells.get(column) for key, column in optional.items()}
    tasks: dict[str, dict[str, Any]] = {}
    family_rows: dict[str, int] = {}  # task -> the row that gave its family
    for row, (name, text_input, text_output) in enumerate(
        zip(cells[columns.task], cells[columns.input], cells[columns.output], strict=True)
    ):
        family, template, options, ceiling, scores, *task_fields = (
            None if values is None else values[row] for values in values_of.values()
        )
        task = tasks.setdefault(
            str(name),
            {
                "family": None,
                "ceiling": None,
                "templates": [],
                "inputs": [],
                "outputs": [],
                "options": [],
                "scores": [],
                "row_of": {},
                "repeated": 0,
                "conflicting": 0,
            },
        )
        if family is not None and not is_missing(family):
            family = str(family)
            if task["family"] is not None and family != task["family"]:
                raise ValueError(
                    f"{source}: task {str(name)!r} is in family {task['family']!r} (row {family_rows[str(name)]}) "
                    f"and {family!r} (row {row}); a task has one family. Rename one of the two tasks (as when two "
                    "sources are merged: prefix the source), or give every row of the task the same family."
                )
            task["family"] = family
            family_rows.setdefault(str(name), row)
        if ceiling is not None and not is_missing(ceiling):
            task["ceiling"] = parse_ceiling(ceiling, f"{source}, row {row}")
        for key, value in zip(TASK_FIELDS, task_fields, strict=True):
            # A task's: its first row's. Whitespace is a value here (a separator "\n\n"), only None is none.
            if isinstance(value, str) and key not in task:
                task[key] = value
        outputs = parse_outputs(text_output, f"{source}, row {row}")
        text_input, options = str(text_input), parse_options(options)
        template = (
            check_template(str(template), f"{source}, row {row}")
            if template is not None and not is_missing(template)
            else default_template
        )
        # A repeated example could land in both the support and the query; one input with other options, or
        # under another template, is another example (BIG-bench's questions that are their options, after an
        # empty input; one word asked in French and in German).
        key = (template, text_input, tuple(sorted(options)) if options else None)
        if key in task["row_of"]:
            known = task["outputs"][task["row_of"][key]]
            added = [output for output in outputs if output not in known]
            task["conflicting" if added else "repeated"] += 1
            known += added
            continue
        task["row_of"][key] = len(task["inputs"])
        task["templates"].append(template)
        task["inputs"].append(text_input)
        task["outputs"].append(outputs)
        task["options"].append(options)
        task["scores"].append(parse_scores(scores, options, f"{source}, row {row}"))
    for name, task in tasks.items():
        del task["row_of"]
        repeated, conflicting = task.pop("repeated"), task.pop("conflicting")
        if conflicting:
            rank_zero_info(
                f"Task {name!r}: {conflicting} rows repeat an earlier input (with the same template and options) with "
                "another output; each input is kept once, with every output given for it as a correct output (the "
                "first one trains)."
                + (f" {repeated} more rows repeat an input and its output: dropped." if repeated else "")
            )
        if max_examples is not None:
            for key in ("templates", "inputs", "outputs", "options", "scores"):
                task[key] = task[key][:max_examples]
        for index, (outputs, options, scores) in enumerate(
            zip(task["outputs"], task["options"], task["scores"], strict=True)
        ):
            example = f"Task {name!r}, example {index} ({task['inputs'][index][:40]!r})"
            unlisted = [output for output in outputs if options is not None and output not in options]
            if unlisted:
                raise ValueError(
                    f"{example} lists options {list(options)}, but its outputs {unlisted[:5]} are not among them. "
                    "List every correct output in that row's options, or leave its options empty."
                )
            if scores is None:
                continue
            top = max(scores)
            best = [option for option, score in zip(options, scores, strict=True) if score == top]
            if set(best) != set(outputs):
                # Accuracy grades by the scores, the correct-option probability by the outputs: they must agree.
                raise ValueError(
                    f"{example} has the outputs {outputs[:5]}, but its scores {list(scores)} rank highest "
                    f"{best[:5]} among its options {list(options)}. The correct outputs are the options scored "
                    "highest (e.g. [1, 0.5, 0] for the first option, with partial credit for the second): make the "
                    "scores agree with the outputs, or leave the scores empty."
                )
        if task["ceiling"] is not None:
            fewest = min(len(options) if options else 0 for options in task["options"])
            if fewest < 2 or task["ceiling"] <= 1 / fewest:
                raise ValueError(
                    f"Task {name!r} gives the ceiling {task['ceiling']} but "
                    + (
                        f"an example has {fewest} options"
                        if fewest < 2
                        else f"an example has only {fewest} options: chance there is {1 / fewest:.3g}"
                    )
                    + ". A ceiling is an accuracy among options, above chance: list at least 2 options on every "
                    "row of the task and give a ceiling above 1 / options, or leave the ceiling empty."
                )
    return tasks


def tasks_from_folder(
    folder: Path, columns: TableColumns, default_template: str, max_examples: int | None = None
) -> dict[str, dict[str, Any]]:
    """:func:`tasks_from_table` of each table file in ``folder``: one task per file, named by the file."""
    found = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    files = [path for path in found if path.suffix.lower() in TABLE_FORMATS]
    if len(files) < len(found):
        others = [path.name for path in found if path not in files]
        rank_zero_warn(
            f"Task folder {folder}: skipped {len(others)} files that are not tables ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); each task is a {', '.join(TABLE_FORMATS)} file."
        )
    if not files:
        raise ValueError(f"No task tables in folder {folder}: put one .jsonl/.csv/.parquet file per task there.")
    tasks: dict[str, dict[str, Any]] = {}
    sources: dict[str, Path] = {}
    for file in files:
        claim_name(sources, file.stem, file, "task", "merge them into one file")
        table = read_table(str(file))
        table = table.remove_columns([c for c in table.column_names if c == columns.task])
        table = table.add_column(columns.task, [file.stem] * len(table))
        tasks |= tasks_from_table(table, str(file), columns, default_template, max_examples)
    return tasks


def parse_options(options: Any) -> tuple[str, ...] | None:
    """A row's options: a list, or one string of options separated by ``|``; ``None`` when it lists none."""
    if options is None or (not isinstance(options, str) and len(options) == 0) or is_missing(options):
        return None
    return tuple(str(option) for option in (options.split("|") if isinstance(options, str) else options))


def parse_scores(value: Any, options: tuple[str, ...] | None, where: str) -> tuple[float, ...] | None:
    """A row's option scores (the grade for choosing each option), one number per option; ``None`` when it lists
    none."""
    if is_missing(value) or (isinstance(value, list | tuple) and not value):
        return None
    if isinstance(value, str):  # a CSV cell: "1|0.5|0", as options are written, or "[1, 0.5, 0]"
        text = value.strip()
        listed = text[1:-1].split(",") if text.startswith("[") and text.endswith("]") else text.split("|")
    else:
        listed = value
    try:
        scores = tuple(float(score) for score in listed)
    except (TypeError, ValueError):
        scores = ()
    if options is None or len(scores) != len(options) or not all(map(math.isfinite, scores)):
        raise ValueError(
            f"{where}: the scores {value!r} do not give one number per option of {list(options or [])}. List one "
            "score per option, in the options' order (e.g. [1, 0.5, 0]; in a CSV cell 1|0.5|0), or leave the scores "
            "empty."
        )
    return scores


def parse_ceiling(value: Any, where: str) -> float:
    """A task's ceiling from its table: an accuracy in (0, 1]."""
    try:
        ceiling = float(value)
    except (TypeError, ValueError):
        ceiling = math.nan
    if not 0 < ceiling <= 1:
        raise ValueError(
            f"{where}: the ceiling {value!r} is not an accuracy in (0, 1]. Give each task's best reachable accuracy "
            "with shots support examples (e.g. 0.94), or leave the ceiling empty."
        )
    return ceiling


def parse_outputs(value: Any, where: str) -> list[str]:
    """A row's correct outputs: one text, or a list of texts (the first one trains; any one is an exact match)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        outputs = list(dict.fromkeys(str(output) for output in value if not is_missing(output)))
        if not outputs:
            raise ValueError(f"{where}: the output is an empty list: give at least one correct output.")
        return outputs
    return [str(value)]
