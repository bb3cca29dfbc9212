"""The README's hand-off commands run as written, from a clean folder (only short step counts added)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Added to each command so that it runs in seconds; nothing else is changed.
SHORT = {
    "fit": ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.num_val_tasks=2",
            "--data.init_args.num_test_tasks=2", "--trainer.enable_progress_bar=false"],
    "pretrain": ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
                 "--data.init_args.max_tokens_per_domain=3000"],
    "export": [],
}  # fmt: skip


def handoff_commands() -> tuple[list[list[str]], list[list[str]]]:
    """The hand-off section's first block (fit, export, pretrain) and its other commands naming ``init_from``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Hand-off", 1)[1].split("\n### ", 1)[0]
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
        text = re.sub(r"\\\n\s*", " ", block)
        blocks.append([shlex.split(line, comments=True) for line in text.splitlines() if line.strip()])
    pipeline = blocks[0]
    with_init_from = [command for block in blocks[1:] for command in block
                      if any(arg.startswith("--model.init_from") for arg in command)]  # fmt: skip
    return pipeline, with_init_from


def run(command: list[str], cwd: Path) -> None:
    assert command[0] == "lightning-meta", command
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*command, *SHORT[command[1]]], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, f"{shlex.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_handoff_commands_run_as_written(tmp_path):
    pipeline, with_init_from = handoff_commands()
    assert [command[1] for command in pipeline] == ["fit", "export", "pretrain"]
    assert with_init_from, "the README's hand-off section names no --model.init_from command"
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # a clone's configs, and nothing else
    fit, export, pretrain = pipeline
    run(fit, tmp_path)
    # From the checkpoint itself, before any export exists: the data's tokenizer follows init_from.
    for command in with_init_from:
        run(command, tmp_path)
    assert not (tmp_path / "exports").exists()
    run(export, tmp_path)
    run(pretrain, tmp_path)
    exports = sorted(tmp_path.glob("lightning_logs/version_*/export/config.json"))
    assert len(exports) == len(with_init_from) + 1  # every pretrain run exported its result
