"""One reader for every local table: the LM corpus and the text-classification data accept the same
paths, and fail on a bad file the same way, naming the file, the line and the fix."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from lightning_meta.data.tables import read_table
from lightning_meta.datamodules import LanguageModelingTasksDataModule, TextClassificationDataModule

LABELS = ["buy", "close", "fold", "lift", "move", "open", "paint", "sell", "wash"]
ROWS = [
    {"text": f"please {verb} the {thing} number {i} for me, and do it well, thank you.", "label": verb}
    for verb in LABELS
    for thing in ("door", "box")
    for i in range(2)
]
#: The rows as JSON lines: line n + 1 is row n.
JSON_LINES = "".join(json.dumps(row) + "\n" for row in ROWS).encode()


def datamodules(path: str) -> list[LanguageModelingTasksDataModule | TextClassificationDataModule]:
    """An LM datamodule (a domain per label) and a text-classification one over the same table."""
    return [
        LanguageModelingTasksDataModule(
            tokenizer="embedded-bpe-512",
            corpus=path,
            domain_column="label",
            block_size=8,
            shots=1,
            queries=1,
            num_val_tasks=1,
            num_test_tasks=1,
        ),
        TextClassificationDataModule(
            path, tokenizer="embedded-wordpiece-512", ways=2, shots=1, queries=1, max_length=16, num_eval_episodes=2
        ),
    ]


def load(datamodule: LanguageModelingTasksDataModule | TextClassificationDataModule) -> list[str]:
    """Read the data through the datamodule; its domains or classes."""
    datamodule.setup("fit")
    if isinstance(datamodule, LanguageModelingTasksDataModule):
        return sorted(datamodule.domain_blocks)
    return datamodule.class_names


def write_table(folder, layout: str) -> str:
    """``ROWS`` written in ``layout``; the path or glob to give."""
    table = Dataset.from_list(ROWS)
    if layout == "upper_case_jsonl":
        table.to_json(folder / "DATA.JSONL")
        return str(folder / "DATA.JSONL")
    if layout == "upper_case_csv":
        table.to_csv(folder / "Data.CSV", index=False)
        return str(folder / "Data.CSV")
    if layout == "parquet":
        table.to_parquet(folder / "data.parquet")
        return str(folder / "data.parquet")
    if layout == "glob":
        (folder / "parts" / "nested").mkdir(parents=True)
        table.select(range(20)).to_json(folder / "parts" / "a.jsonl")
        table.select(range(20, len(ROWS))).to_json(folder / "parts" / "nested" / "b.jsonl")
        (folder / "parts" / ".stale.jsonl").write_text("not JSON: a hidden file the glob leaves out")
        return str(folder / "parts" / "**" / "*.jsonl")
    DatasetDict(train=table.select(range(20)), test=table.select(range(20, len(ROWS)))).save_to_disk(folder / "saved")
    return str(folder / "saved")


@pytest.mark.parametrize("layout", ["upper_case_jsonl", "upper_case_csv", "parquet", "glob", "saved_dataset_dict"])
def test_both_datamodules_read_the_same_tables(tmp_path, layout):
    path = write_table(tmp_path, layout)
    assert sorted(read_table(path)["text"]) == sorted(row["text"] for row in ROWS)
    for datamodule in datamodules(path):
        assert load(datamodule) == LABELS


BAD_FILES = {
    "empty": ("data.jsonl", b"", r"data\.jsonl is empty \(0 bytes\): write its rows, or remove it"),
    "malformed_line": (
        "data.jsonl",
        JSON_LINES + b'{"text": "one more", "label": open}\n',
        r"data\.jsonl, line 37: not valid JSON \(Expecting value, column 31\)\. Fix or delete that line: each line "
        r"holds one object",
    ),
    "latin1_jsonl": (
        "data.jsonl",
        JSON_LINES + '{"text": "un café", "label": "open"}\n'.encode("latin-1"),
        r"data\.jsonl, line 37: byte 0xe9 is not UTF-8 \(the file is in another encoding, such as Latin-1 or "
        r"Windows-1252\)\. Re-encode it to UTF-8, e.g\. iconv -f latin1 -t utf-8 \S+data\.jsonl > \S+data\.jsonl\.utf8",
    ),
    "latin1_csv": (
        "data.csv",
        "text,label\nun thé,open\nun café,open\n".encode("latin-1"),
        r"data\.csv, line 2: byte 0xe9 is not UTF-8 .* iconv -f latin1 -t utf-8",
    ),
}


@pytest.mark.parametrize("which", ["language_modeling", "text_classification"])
@pytest.mark.parametrize("problem", BAD_FILES)
def test_both_datamodules_name_the_bad_file_line_and_fix(tmp_path, problem, which):
    name, content, message = BAD_FILES[problem]
    (tmp_path / name).write_bytes(content)
    lm, text = datamodules(str(tmp_path / name))
    with pytest.raises(ValueError, match=message):
        load(lm if which == "language_modeling" else text)


TABLE_ERRORS = {
    "csv_long_row": ("t.csv", "text,label\na,1\nb, c,2\n", r"t\.csv, line 3: 3 fields where the header has 2\. Quote"),
    "csv_header_only": ("t.csv", "text,label\n", r"t\.csv has a header but no rows: write its rows, or remove it\."),
    "blank_lines_only": ("t.jsonl", "\n  \n", r"t\.jsonl has no rows \(blank lines only\)"),
    "empty_list": ("t.json", "[]", r"t\.json has no rows \(an empty list\)"),
    "line_not_an_object": ("t.jsonl", '{"text": "a"}\n[1, 2]\n', r"t\.jsonl, line 2: \[1, 2\] is not an object"),
    "json_document": (
        "t.json",
        '[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 2}\n]\n',
        r"t\.json, line 3: not valid JSON \(Expecting ',' delimiter, column 16\)\. Fix the file: a list of objects, or "
        "one object per line",
    ),
    "not_parquet": ("t.parquet", "text,label\na,1\n", r"t\.parquet is not a Parquet file \(.*\)\. Write it with"),
}


@pytest.mark.parametrize("problem", TABLE_ERRORS)
def test_bad_files_name_the_file_and_line(tmp_path, problem):
    name, content, message = TABLE_ERRORS[problem]
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_table(str(tmp_path / name))


def test_bad_paths_name_the_fix(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"Cannot read '.*notes\.txt': give a \.json, \.jsonl, \.csv, \.parquet \(any"):
        read_table(str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match=r"No file or folder matches '.*missing\.jsonl'\. Nothing is download"):
        read_table(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"is a folder but not one written by Dataset\.save_to_disk"):
        read_table(str(tmp_path))
    Dataset.from_list(ROWS).to_csv(tmp_path / "rows.csv")
    Dataset.from_list(ROWS).to_json(tmp_path / "rows.jsonl")
    with pytest.raises(ValueError, match=r"'.*rows\.\*' matches files of several formats \(csv, json\): give one"):
        read_table(str(tmp_path / "rows.*"))


def test_csv_cells_keep_their_exact_text(tmp_path):
    """No type inference: 007 stays 007, 1e3 stays 1e3, and None/NA/null are text; only an empty cell is missing."""
    path = tmp_path / "t.csv"
    path.write_text('input,output\n007,3\nNone,1e3\nNA,null\n"x, y",\n')
    table = read_table(str(path))
    assert table["input"] == ["007", "None", "NA", "x, y"]
    assert table["output"] == ["3", "1e3", "null", None]


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_files_of_one_glob_with_different_columns_are_refused_naming_both(tmp_path, suffix):
    # CSV read every file by the first one's header: the second file's options were dropped without a word.
    first, second = [{"task": "t", "input": "a", "output": "b"}], [{"task": "t", "input": "a", "output": "b"}]
    second[0]["options"] = "b|c"
    for name, rows in (("a", first), ("b", second)):
        table = Dataset.from_list(rows)
        {"csv": table.to_csv, "jsonl": table.to_json, "parquet": table.to_parquet}[suffix](
            tmp_path / f"{name}.{suffix}"
        )
    with pytest.raises(ValueError, match=r"have different columns: .*a\.\w+ has .*b\.\w+ has .* \(only b\.\w+ has "):
        read_table(str(tmp_path / f"*.{suffix}"))


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    (tmp_path / "excel.csv").write_text("task,input,output\nt,a,b\n", encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    table = read_table(str(tmp_path / "excel.csv"))
    assert table.column_names == ["task", "input", "output"] and table["task"] == ["t"]
