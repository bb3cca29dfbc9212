"""A user's own control-style table, as the Recipe section of this folder's README runs it: label-mapping tasks
written as table rows (``task, family, input, output, options, ceiling``), the training tasks (family ``train``)
from the training words, the held-out ones (``val``, ``test``) from words no training task uses.

    python benchmarks/control/write_table.py tasks.jsonl            # 4,800 training, 64 val, 256 test tasks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lightning_meta.datamodules.control_tasks import ControlSettings, ControlTasks


def write_table(path: Path, counts: dict[str, int], seed: int = 123) -> int:
    """Write ``counts[split]`` label-mapping tasks per split to ``path`` (JSON lines); returns the rows written."""
    tasks = ControlTasks(ControlSettings(["label_mapping"]), shots=8)
    generator = torch.Generator().manual_seed(seed)
    rows = 0
    with path.open("w") as file:
        for split, count in counts.items():
            for index in range(count):
                task = tasks.draw(generator, split)
                for (text, label), options in zip(task.examples, task.options, strict=True):
                    row = {
                        "task": f"{split}{index}",
                        "family": split,
                        "input": text,
                        "output": label,
                        "options": list(options),
                        "ceiling": round(task.ceiling, 4),
                    }
                    file.write(json.dumps(row) + "\n")
                    rows += 1
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--train", type=int, default=4800)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args(argv)
    rows = write_table(args.path, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    print(f"{args.path}: {rows} rows")


if __name__ == "__main__":
    main()
