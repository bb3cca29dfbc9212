"""The README's commands as the tests read them: one extraction, one way to shorten a command, one way to run it.

Used by ``test_readme_commands.py`` (every command) and ``test_readme_handoff.py`` (the hand-off pipeline).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: Added to each ``lightning-meta`` subcommand so that it runs in seconds; nothing else is changed. Four evaluation
#: tasks: two batches of two, one for each of the 2-process (DDP, FSDP) configs' processes.
SHORT = {
    "fit": [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--data.init_args.num_val_tasks=4",
        "--data.init_args.num_test_tasks=4",
        "--trainer.enable_progress_bar=false",
    ],
    "validate": ["--data.init_args.num_val_tasks=4", "--trainer.enable_progress_bar=false"],
    "test": ["--data.init_args.num_test_tasks=4", "--trainer.enable_progress_bar=false"],
    "pretrain": [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.max_tokens_per_domain=3000",
    ],
    "export": [],
}


@dataclass(frozen=True)
class Command:
    """One command of a fenced shell block: where it is, its environment assignments and its arguments."""

    line: int  #: the README line where the command starts
    section: str  #: the heading above it
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join([*(f"{name}={value}" for name, value in self.env.items()), shlex.join(self.argv)])

    @property
    def program(self) -> tuple[str, ...]:
        """``("lightning-meta",)`` or ``("python", "-m", "lightning_meta")`` for this package's command, else ``()``."""
        for program in (("lightning-meta",), ("python", "-m", "lightning_meta")):
            if self.argv[: len(program)] == program and len(self.argv) > len(program):
                return program
        return ()

    @property
    def subcommand(self) -> str | None:
        """``fit``, ``test``, ...: the word after ``lightning-meta`` (``None`` for another program)."""
        return self.argv[len(self.program)] if self.program else None

    @property
    def options(self) -> tuple[str, ...]:
        """The arguments after the subcommand."""
        return self.argv[len(self.program) + 1 :] if self.program else ()


@dataclass(frozen=True)
class FencedBlock:
    line: int  #: the line of the opening fence
    language: str
    section: str
    text: str


def fenced_blocks(markdown: str) -> list[FencedBlock]:
    """Every fenced code block, with its language and the heading above it."""
    blocks, section = [], ""
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and not line.startswith("#!"):
            section = line.lstrip("#").strip()
        if line.startswith("```"):
            start, language = index, line[3:].strip()
            index += 1
            body = []
            while index < len(lines) and not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            blocks.append(FencedBlock(start + 1, language, section, "\n".join(body)))
        index += 1
    return blocks


def shell_commands(block: FencedBlock) -> list[Command]:
    """The commands of a ``bash`` block: continuation lines joined, comments dropped, a quoted argument may
    span lines (``python -c "..."``), leading ``NAME=value`` assignments taken as the environment."""
    commands = []
    pending, first_line = "", 0
    for offset, line in enumerate(block.text.splitlines(), start=block.line + 1):
        if not pending:
            first_line = offset
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the argument goes on on the next line
            continue
        pending = ""
        while words:  # `a && b`: two commands
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1 :]
            env = {}
            while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", command[0]):
                name, value = command.pop(0).split("=", 1)
                env[name] = value
            if command:
                commands.append(Command(first_line, block.section, tuple(command), env))
    return commands


def readme_commands(markdown: str | None = None) -> list[Command]:
    """Every command of the README's ``bash`` blocks, in order."""
    markdown = README.read_text() if markdown is None else markdown
    return [
        command for block in fenced_blocks(markdown) if block.language == "bash" for command in shell_commands(block)
    ]


def python_files(markdown: str | None = None) -> dict[str, str]:
    """The README's ``python`` blocks that start with a file name comment (``# my_algos.py``), by name."""
    markdown = README.read_text() if markdown is None else markdown
    files = {}
    for block in fenced_blocks(markdown):
        first = block.text.split("\n", 1)[0]
        match = re.fullmatch(r"# (\w+\.py)", first.strip())
        if block.language == "python" and match:
            files[match.group(1)] = block.text
    return files


def run_shortened(
    command: Command, cwd: Path, timeout: int | None = 600, short: bool = True
) -> subprocess.CompletedProcess:
    """Run a ``lightning-meta`` command with its ``SHORT`` options (as written with ``short=False``) in ``cwd``,
    one torch thread unless the command sets ``OMP_NUM_THREADS``; fails with the command and the end of its
    output when it exits with an error."""
    assert command.subcommand in SHORT, command.text
    env = dict(os.environ, OMP_NUM_THREADS="1", **command.env)
    if "PYTHONPATH" in command.env:  # the README's relative PYTHONPATH=. means the folder it runs in
        env["PYTHONPATH"] = os.pathsep.join(str(cwd / path) for path in command.env["PYTHONPATH"].split(os.pathsep))
    program = ["lightning-meta"] if command.program == ("lightning-meta",) else [sys.executable, "-m", "lightning_meta"]
    argv = [*program, command.subcommand, *command.options, *(SHORT[command.subcommand] if short else [])]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(
            f"README line {command.line}: {command.text} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result
