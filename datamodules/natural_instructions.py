"""Natural-Instructions v2: its ``taskNNN_name.json`` files, or its hub mirror's tables, as one row per example
(:class:`~lightning_meta.datamodules.collection_rows.CollectionRows`); the prompt as in the Tk-Instruct paper. The
layouts are described in :mod:`~lightning_meta.datamodules.task_collections`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning_meta.data.tables import read_table, table_columns
from lightning_meta.datamodules.collection_rows import (
    OTHER_FAMILY,
    CollectionRows,
    Example,
    mirror_tables,
    sample_examples,
)
from lightning_meta.datamodules.templates import literal_template_text

#: Natural-Instructions prompt, as in the Tk-Instruct paper (definition, positive examples, input).
NI_DEFINITION = "Definition: {definition}\n\n"
NI_EXAMPLE = "Positive Example {number} -\nInput: {input}\nOutput: {output}\n\n"
NI_QUERY = "Now complete the following example -\nInput: {input}\nOutput:"

NI_FILE = re.compile(r"task\d+_.*\.json")
#: How many of a folder's first task files are opened to recognise Natural-Instructions (one may be broken).
_NI_FILES_PROBED = 3

#: The columns of Natural-Instructions' hub mirror (``Muennighoff/natural-instructions``), one row per output.
NI_MIRROR_COLUMNS = ("task_name", "definition", "inputs", "targets")


def ni_files(folder: Path) -> list[Path]:
    """The Natural-Instructions task files in ``folder`` (or its ``tasks/``): files ``taskNNN_name.json``, one of
    the first few of which holds a ``"Definition"``."""
    for candidate in (folder / "tasks", folder):
        files = sorted(file for file in candidate.glob("task*.json") if NI_FILE.fullmatch(file.name))
        if any(map(_holds_definition, files[:_NI_FILES_PROBED])):
            return files
    return []


def _holds_definition(file: Path) -> bool:
    """Whether ``file`` is a JSON object with a ``"Definition"``: seen in its opening, or (its keys in another
    order) in the whole file."""
    with file.open("rb") as opening:
        if b'"Definition"' in opening.read(1 << 16):
            return True
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "Definition" in data


def read_natural_instructions(
    folder: Path, cap: int | None, seed: int, positive_examples: int
) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    rows = CollectionRows()
    files = ni_files(folder)
    for file in files:
        problem = _ni_task(file, rows, cap, seed, positive_examples)
        if problem is not None:
            rows.problem(f"Skipped {file}: {problem}.")
    if not files:
        _read_ni_mirror(folder, rows, cap, seed, positive_examples)
    message = (
        f"Natural Instructions: {len(set(rows.columns['task']))} tasks, {len(rows.columns['task'])} examples from "
        f"{folder}"
        + (f" (at most {cap} per task)" if cap is not None else "")
        + f"; skipped {len(rows.problems)} files with bad data"
        + f" and {rows.dropped} instances without a text input and output"
    )
    return rows.columns, {"message": message, "problems": rows.problems, "presets": {}}


def _ni_task(file: Path, rows: CollectionRows, cap: int | None, seed: int, positive_examples: int) -> str | None:
    """Add the task in ``file`` to ``rows`` (its instances without a text input and output dropped and counted);
    or what is wrong with it and the fix."""
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"it is not valid JSON ({error}). Fix the file"
    if not isinstance(data, dict):
        return "it is not a JSON object. Write one object with Definition, Positive Examples, Instances"
    return _ni_data(file.stem, data, rows, cap, seed, positive_examples)


def _read_ni_mirror(folder: Path, rows: CollectionRows, cap: int | None, seed: int, positive_examples: int) -> None:
    """Add the tasks of Natural-Instructions' hub mirror in ``folder`` (a ``save_to_disk`` folder, or its JSON-lines
    files in any of its folders) to ``rows``: one row per instance and output, gathered into the task's data."""
    first = next(mirror_tables(folder))
    table = read_table(str(first if first == folder else folder / "**" / f"*{first.suffix}"))
    missing = [column for column in NI_MIRROR_COLUMNS if column not in table.column_names]
    if missing:
        raise ValueError(
            f"{folder}: a table of it lacks the column(s) {missing} of Natural-Instructions' mirror; "
            f"give every table {list(NI_MIRROR_COLUMNS)}."
        )
    tasks: dict[str, dict[str, Any]] = {}
    instances: dict[str, dict[str, list[Any]]] = {}  # task -> input -> its outputs, in order
    columns = table_columns(table, list(NI_MIRROR_COLUMNS))
    for name, definition, text, target in zip(*columns.values(), strict=True):
        if not isinstance(name, str) or not name.strip():
            rows.dropped += 1
            continue
        tasks.setdefault(name, {"Definition": definition})
        outputs = instances.setdefault(name, {}).setdefault(text if isinstance(text, str) else "", [])
        outputs += target if isinstance(target, list) else [target]
    for name, data in tasks.items():
        data["Instances"] = [{"input": text, "output": outputs} for text, outputs in instances[name].items()]
        problem = _ni_data(name, data, rows, cap, seed, positive_examples)
        if problem is not None:
            rows.problem(f"Skipped task {name} of {folder}: {problem}.")


def _ni_data(
    name: str, data: dict[str, Any], rows: CollectionRows, cap: int | None, seed: int, positive_examples: int
) -> str | None:
    """Add the task ``name`` whose fields are ``data`` (a task file's) to ``rows``; or what is wrong with it."""
    definition = data.get("Definition")
    definition = [definition] if isinstance(definition, str) else definition
    if not isinstance(definition, list) or not definition or not all(isinstance(part, str) for part in definition):
        return 'its "Definition" is not text. Make it a list of strings, ["Given a ..., answer ..."]'
    demonstrations = [example for example in data.get("Positive Examples") or [] if isinstance(example, dict)]
    # The task's own text is taken literally: a "{word}" in it is text, never a placeholder.
    definition_text = literal_template_text(" ".join(part.strip() for part in definition))
    prompt = NI_DEFINITION.format(definition=definition_text)
    for number, example in enumerate(demonstrations[:positive_examples], 1):
        if not isinstance(example.get("input"), str) or not isinstance(example.get("output"), str):
            return f'its positive example {number} lacks a text "input" or "output". Fix it, or use positive_examples=0'
        prompt += NI_EXAMPLE.format(
            number=number,
            input=literal_template_text(example["input"].strip()),
            output=literal_template_text(example["output"].strip()),
        )
    template = prompt + NI_QUERY
    instances = data.get("Instances")
    if not isinstance(instances, list) or not instances:
        return 'it has no "Instances". Add them: [{"id": ..., "input": ..., "output": [...]}, ...]'
    examples: list[Example] = []
    seen: dict[str, list[str]] = {}  # input -> its outputs: a repeated input adds its outputs, as in a task table
    for instance in instances:
        text = instance.get("input") if isinstance(instance, dict) else None
        outputs = instance.get("output") if isinstance(instance, dict) else None
        outputs = [outputs] if isinstance(outputs, str) else outputs if isinstance(outputs, list) else []
        outputs = [output for output in outputs if isinstance(output, str) and output.strip()]
        if not isinstance(text, str) or not text.strip() or not outputs:
            rows.dropped += 1
        elif text in seen:
            seen[text] += [output for output in outputs if output not in seen[text]]
        else:
            seen[text] = list(dict.fromkeys(outputs))
            examples.append((text, seen[text], None, None))
    if not examples:
        return 'none of its "Instances" has a text "input" and "output". Fix them: {"input": "...", "output": ["..."]}'
    categories = data.get("Categories")
    family = str(categories[0]) if isinstance(categories, list) and categories else OTHER_FAMILY
    rows.add(name, family, template, [examples[index] for index in sample_examples(len(examples), cap, seed, name)])
    return None
