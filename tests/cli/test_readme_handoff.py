"""The README's hand-off commands run as written, from a clean folder (only short step counts added)."""

from __future__ import annotations

import pytest
from readme_commands import README, ROOT, Command, fenced_blocks, run_shortened, shell_commands


def handoff_commands() -> tuple[list[Command], list[Command]]:
    """The hand-off section's first block (fit, export, pretrain) and its other commands naming ``init_from``."""
    blocks = [
        shell_commands(block)
        for block in fenced_blocks(README.read_text())
        if block.language == "bash" and block.section.startswith("Hand-off")
    ]
    pipeline = blocks[0]
    with_init_from = [
        command
        for block in blocks[1:]
        for command in block
        if any(arg.startswith("--model.init_from") for arg in command.argv)
    ]
    return pipeline, with_init_from


@pytest.mark.slow
def test_readme_handoff_commands_run_as_written(tmp_path):
    pipeline, with_init_from = handoff_commands()
    assert [command.subcommand for command in pipeline] == ["fit", "export", "pretrain"]
    assert with_init_from, "the README's hand-off section names no --model.init_from command"
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # a clone's configs, and nothing else
    fit, export, pretrain = pipeline
    run_shortened(fit, tmp_path)
    # From the checkpoint itself, before any export exists: the data's tokenizer follows init_from.
    for command in with_init_from:
        run_shortened(command, tmp_path)
    assert not (tmp_path / "exports").exists()
    run_shortened(export, tmp_path)
    run_shortened(pretrain, tmp_path)
    exports = sorted(tmp_path.glob("lightning_logs/version_*/export/config.json"))
    assert len(exports) == len(with_init_from) + 1  # every pretrain run exported its result
