"""One reader for local tables (``json``/``jsonl``/``csv``/``parquet`` files, ``save_to_disk`` folders).

The LM corpus and the text-classification data both read their tables here, so they accept the same
paths and fail with the same messages. Nothing is downloaded. ``datasets`` reports a bad file without
its name or line (a bare ``StopIteration``, "An error occurred while generating the dataset"), so when
reading fails the files are checked again, here, to name the file, the line and the fix.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset

#: Data-file suffixes (in any case) and the ``datasets`` builder that reads each.
TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
#: Row numbers shown in an error about missing values.
_SHOWN_ROWS = 5


def read_table(path: str) -> Dataset:
    """The rows of a local table: a ``.json``/``.jsonl``/``.csv``/``.parquet`` file (suffix in any case),
    the files a glob matches (``data/*.jsonl``, ``data/**/*.csv``; one format), or a ``save_to_disk``
    folder (a saved ``DatasetDict``'s splits are concatenated)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    location = Path(path).expanduser()
    if location.is_dir():
        if not is_saved_dataset(location):
            raise FileNotFoundError(
                f"{path!r} is a folder but not one written by Dataset.save_to_disk (no state.json or "
                f"dataset_dict.json in it). Give such a folder, or a data file or glob: {_suffixes()}."
            )
        loaded = datasets.load_from_disk(str(location))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets(list(loaded.values()))
        return loaded
    # A shell's glob rules: dot-files only where the pattern names them, ** for any depth of folders.
    matches = [location] if location.is_file() else sorted(map(Path, glob.glob(str(location), recursive=True)))
    files = [file for file in matches if file.is_file()]
    if not files:
        raise FileNotFoundError(
            f"No file or folder matches {path!r}. Nothing is downloaded: give a local file, glob or save_to_disk "
            "folder."
        )
    unknown = [file for file in files if file.suffix.lower() not in TABLE_FORMATS]
    if unknown:
        raise ValueError(
            f"Cannot read {str(unknown[0])!r}: give a {_suffixes()} file (or a glob of them), or a folder written by "
            "Dataset.save_to_disk."
        )
    builders = sorted({TABLE_FORMATS[file.suffix.lower()] for file in files})
    if len(builders) > 1:
        raise ValueError(f"{path!r} matches files of several formats ({', '.join(builders)}): give one format.")
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"{file} is empty (0 bytes): write its rows, or remove it (or leave it out of the glob).")
    if builders[0] != "json":  # a header or schema gives a file's columns; a JSON file's first row may not
        _check_same_columns(path, files)
    try:
        table = datasets.load_dataset(
            builders[0], data_files=[str(file) for file in files], split="train", **_reader_options(builders[0], files)
        )
        if builders[0] == "json":
            # pyarrow's JSON reader does not check UTF-8: a Latin-1 file would load, then fail on the first
            # row read. Validating is one pass in C++, cheap next to reading the rows into Python.
            table.data.table.validate(full=True)
        return table
    except (ValueError, DatasetGenerationError) as error:
        for file in files:
            problem = _diagnose(file, builders[0])
            if problem is not None:
                raise ValueError(problem) from error
        _check_same_columns(path, files)
        raise ValueError(f"Cannot read {path!r} as {builders[0]}: {_root_cause(error)}") from error


def _check_same_columns(path: str, files: list[Path]) -> None:
    """Refuses files of one table with different columns (a JSON file's: its first row's keys): ``datasets`` reads
    them by the first file's columns, dropping the others' extra ones without a word (CSV) or failing with a cast
    error that names no file (JSON)."""
    columns = {file: column_names(file) for file in files}
    first = files[0]
    for file in files[1:]:
        if columns[file] and columns[first] and set(columns[file]) != set(columns[first]):
            only_first = sorted(set(columns[first]) - set(columns[file]))
            only_other = sorted(set(columns[file]) - set(columns[first]))
            differ = "; ".join(
                f"only {where} has {names}"
                for where, names in ((first.name, only_first), (file.name, only_other))
                if names
            )
            raise ValueError(
                f"The files that {path!r} matches have different columns: {first} has {columns[first]}, {file} has "
                f"{columns[file]} ({differ}). Give every file the same columns (an empty cell, or null, where a row "
                "has no value), or read them as separate tables."
            )


def _reader_options(builder: str, files: list[Path]) -> dict[str, object]:
    """Read CSV cells as the exact text: pandas would otherwise infer types (``007`` -> 7, ``1e3`` -> 1000.0)
    and turn the strings ``None``/``NA``/``null`` into missing values. Only an empty cell is missing."""
    if builder != "csv":
        return {}
    from datasets import Features, Value

    with files[0].open(encoding="utf-8-sig", errors="replace", newline="") as handle:  # as pandas: no BOM
        header = next((row for row in csv.reader(handle) if row), [])
    return {
        "features": Features({column: Value("string") for column in header}),
        "keep_default_na": False,
        "na_values": [""],
    }


def table_columns(table: Dataset, names: list[str]) -> dict[str, list]:
    """The columns ``names`` of ``table`` as Python lists, each read in one pass.

    ``table[column][row]`` is an Arrow lookup per value, and iterating a column formats row by row: a
    table of 100,000 rows took ~30 s that way, 0.5 s like this.
    """
    return table.select_columns(names).to_dict() if names else {}


def claim_name(claimed: dict[str, Path], name: str, source: Path, what: str, fix: str) -> None:
    """Record that ``source`` (a file or sub-folder) supplies the ``what`` called ``name``, or refuse a second
    source for the same name (``a.csv`` and ``a.jsonl`` in one folder), naming both; ``fix`` ends the message."""
    if name in claimed:
        raise ValueError(f"{claimed[name]} and {source} would both be the {what} {name!r}. Rename one, or {fix}.")
    claimed[name] = source


def column_names(path: Path) -> list[str]:
    """The column names of one table (a data file or a ``save_to_disk`` folder), read without its rows; ``[]`` when
    they cannot be read (reading the table then says why)."""
    try:
        if path.is_dir():
            import datasets

            loaded = datasets.load_from_disk(str(path))  # memory-mapped: no row is read
            return list(
                next(iter(loaded.values())).column_names
                if isinstance(loaded, datasets.DatasetDict)
                else loaded.column_names
            )
        builder = TABLE_FORMATS.get(path.suffix.lower())
        if builder == "parquet":
            import pyarrow.parquet

            return list(pyarrow.parquet.read_schema(path).names)
        with path.open(encoding="utf-8-sig", newline="") as handle:  # a byte-order mark is not a column's
            if builder == "csv":
                return next((row for row in csv.reader(handle) if row), [])
            first = next((line for line in handle if line.strip()), "")
            row = json.loads(first) if builder == "json" else None  # JSON lines: the first row's keys
            return list(row) if isinstance(row, dict) else []
    except (OSError, ValueError):  # unreadable (pyarrow's and json's errors are ValueErrors): not recognised here
        return []


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def is_missing(value: object) -> bool:
    """Whether a cell holds no value: ``None``, NaN, or an empty (or blank) string."""
    if isinstance(value, str):
        return not value.strip()
    return value is None or (isinstance(value, float) and math.isnan(value))


def describe_missing(missing: dict[str, list[int]], rows: int) -> str:
    """``column 'label' has no value (None, NaN or empty) in 3 of 120 rows: 4, 17, 50`` for each column
    with missing values; ``missing`` maps a column to its rows (counted from 0) that have none."""
    parts = []
    for column, at in missing.items():
        if at:
            more = f" and {len(at) - _SHOWN_ROWS} more" if len(at) > _SHOWN_ROWS else ""
            shown = ", ".join(map(str, at[:_SHOWN_ROWS])) + more
            parts.append(f"column {column!r} has no value (None, NaN or empty) in {len(at)} of {rows} rows: {shown}")
    return "; ".join(parts)


def reencode_command(file: Path) -> str:
    """A shell command that re-encodes a Latin-1 ``file`` to UTF-8 in place."""
    return f"iconv -f latin1 -t utf-8 {file} > {file}.utf8 && mv {file}.utf8 {file}"


def _suffixes() -> str:
    return ", ".join(TABLE_FORMATS) + " (any case)"


def _diagnose(file: Path, builder: str) -> str | None:
    """What is wrong with ``file``, with the line and the fix; ``None`` when nothing is found."""
    if builder == "parquet":
        return _diagnose_parquet(file)
    return _non_utf8_line(file) or (_diagnose_json(file) if builder == "json" else _diagnose_csv(file))


def _non_utf8_line(file: Path) -> str | None:
    with file.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{file}, line {number}: byte 0x{line[error.start]:02x} is not UTF-8 (the file is in another "
                    f"encoding, such as Latin-1 or Windows-1252). Re-encode it to UTF-8, e.g. {reencode_command(file)}"
                )
    return None


def _diagnose_json(file: Path) -> str | None:
    text = file.read_text(encoding="utf-8")
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        return f"{file} has no rows (blank lines only): write its rows, or remove it."
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        document_error = error
    else:  # one JSON document: a list of objects, or a single object (one row)
        if document == []:
            return f"{file} has no rows (an empty list): write its rows, or remove it."
        if isinstance(document, list):
            for index, row in enumerate(document):
                if not isinstance(row, dict):
                    return f"{file}: item {index} of the list is {json.dumps(row)[:60]}, not an object {{...}}."
        return None
    if not _parses(lines[0][1]):  # not JSON lines either: the document's own error has the right line
        return (
            f"{file}, line {document_error.lineno}: not valid JSON ({document_error.msg}, column "
            f"{document_error.colno}). Fix the file: a list of objects, or one object per line."
        )
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return (
                f"{file}, line {number}: not valid JSON ({error.msg}, column {error.colno}). Fix or delete that "
                'line: each line holds one object, {"column": value, ...}.'
            )
        if not isinstance(row, dict):
            return f'{file}, line {number}: {line.strip()[:60]} is not an object {{"column": value, ...}}.'
    return None


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _diagnose_csv(file: Path) -> str | None:
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        rows = (row for row in reader if row)  # blank lines, which pandas skips too
        header = next(rows, None)
        if header is None:
            return f"{file} has no rows (blank lines only): write its rows, or remove it."
        count = 0
        for row in rows:
            count += 1
            if len(row) > len(header):  # pandas fills short rows, but refuses long ones
                return (
                    f"{file}, line {reader.line_num}: {len(row)} fields where the header has {len(header)}. Quote "
                    'fields that hold commas ("a, b"), or fix that line.'
                )
        if count == 0:
            return f"{file} has a header but no rows: write its rows, or remove it."
    return None


def _diagnose_parquet(file: Path) -> str | None:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.ParquetFile(file).metadata.num_rows
    except (pyarrow.ArrowException, OSError) as error:
        return f"{file} is not a Parquet file ({error}). Write it with DataFrame.to_parquet or Dataset.to_parquet."
    return f"{file} has no rows: write its rows, or remove it." if rows == 0 else None


def _root_cause(error: BaseException) -> str:
    """The innermost error's message: the one from the parser, not the wrapper's."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"
