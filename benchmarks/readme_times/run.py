"""How long each README command takes, as written (issue 30: one time figure per command, measured).

Runs every ``lightning-meta`` command of the README in full, each in a fresh folder holding the repository's
``configs/`` and the README's own Python files (as ``tests/cli/test_readme_commands.py`` runs them shortened), and
records its CPU seconds (user + system of the command's processes) and wall seconds. Commands run with one
torch thread (the command's default) unless they set ``OMP_NUM_THREADS``, so the CPU time is what the command
takes on one idle core; wall time depends on what else the machine runs. A command that evaluates a fit's
checkpoint first gets that fit (not counted); the hand-off section runs in order in one folder, as a user
would. Commands a test cannot run (the user's own files, GPUs, downloads, optional packages) are listed with the
reason, not timed.

Each command writes its result to ``results/`` (named by the command's text); a rerun skips measured commands (a
changed command is measured again), so the script can be stopped and resumed.

    python benchmarks/readme_times/run.py [--only TEXT ...]   # measure (TEXT: a part of the command)
    python benchmarks/readme_times/run.py --report            # the table, for README.md here
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cli")]  # the README's commands as the tests read them
from readme_commands import Command, python_files, readme_commands, run_shortened  # noqa: E402
from real_models import real_model_skip_reason  # noqa: E402
from test_readme_commands import FIT_CHECKPOINT, config_text, paths_read, why_skipped  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Skip reasons of the README test that do not stop a full run here: what the test leaves to another test.
RUN_ANYWAY = ("a config as shipped", "run in order, as one pipeline")
PIPELINE = "Hand-off"  #: the section whose commands build on each other, in order


def reason_not_timed(command: Command) -> str | None:
    reason = why_skipped(command)
    if reason is None or not reason.startswith(RUN_ANYWAY):
        return reason
    modules = sorted(set(re.findall(r"pkg:(\w+)", config_text(command))))
    if modules and real_model_skip_reason(modules, where=""):  # hours in bf16 on a CPU without native bf16
        return "a pretrained model: its time per step is in the README section and benchmarks that use it"
    return None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def adopt_orphans() -> None:
    """Become the reaper of this process's descendants (Linux): a DDP rank that outlives the process that
    started it is reparented here, not to init, so that its CPU time reaches :func:`cpu_seconds` once reaped."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_orphans() -> None:
    """Wait for every descendant left running or unreaped (its CPU time is counted when it is reaped)."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def measure(command: Command, folder: Path) -> dict:
    """Runs ``command`` as written in ``folder``: its CPU and wall seconds."""
    if FIT_CHECKPOINT in paths_read(command) and not (folder / FIT_CHECKPOINT).exists():
        config = command.argv[command.argv.index("--config") + 1]
        fit = ("lightning-meta", "fit", "--config", config, "--test_after_fit=false")
        run_shortened(Command(command.line, command.section, fit), folder, timeout=None, short=False)
    cpu, wall = cpu_seconds(), time.perf_counter()
    failure = None
    try:
        run_shortened(command, folder, timeout=None, short=False)
    except AssertionError as error:  # the command failed as written: a finding, kept with its last error line
        lines = [line for line in str(error).splitlines() if line.startswith("lightning-meta: error:")]
        failure = lines[-1] if lines else str(error).splitlines()[0]
    reap_orphans()  # the other ranks of a multi-process command
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    result = {"command": command.text, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
    return result if failure is None else result | {"failed": failure}


def prepared_folder(parent: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=parent))
    (folder / "configs").symlink_to(ROOT / "configs")
    for name, text in python_files().items():
        (folder / name).write_text(text)
    return folder


def result_path(command: Command) -> Path:
    """A command's result file, named by its text (the same command written twice is measured once)."""
    return RESULTS / f"{hashlib.sha1(command.text.encode()).hexdigest()[:12]}.json"


def results() -> dict[str, dict]:
    """Every measured command's result, by the command's text."""
    found = (json.loads(path.read_text()) for path in sorted(RESULTS.glob("*.json")))
    return {result["command"]: result for result in found}


def measured(command: Command) -> bool:
    return command.text in results()


def run(only: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    adopt_orphans()
    commands = [c for c in readme_commands() if c.subcommand and reason_not_timed(c) is None]
    commands = [c for c in commands if not only or any(text in c.text for text in only)]
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = None  # the hand-off section shares one folder, in order
        for command in commands:
            if measured(command):
                continue
            in_pipeline = command.section.startswith(PIPELINE)
            if in_pipeline and pipeline is None:
                pipeline = prepared_folder(Path(scratch))
            folder = pipeline if in_pipeline else prepared_folder(Path(scratch))
            print(f"README line {command.line}: {command.text}", flush=True)
            result = measure(command, folder)
            result_path(command).write_text(json.dumps(result, indent=1) + "\n")
            failed = result.get("failed", "")
            print(f"  {result['cpu_s']:.0f} CPU s, {result['wall_s']:.0f} s wall {failed}", flush=True)
            if not in_pipeline:
                shutil.rmtree(folder)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def report() -> str:
    lines = ["| line | command | CPU (one core) | wall |", "|---|---|---|---|"]
    measured_results = results() if RESULTS.is_dir() else {}
    for command in readme_commands():
        if not command.subcommand:
            continue
        text = command.text if len(command.text) <= 110 else command.text[:107] + "..."
        reason = reason_not_timed(command)
        if reason is not None:
            lines.append(f"| {command.line} | `{text}` | not timed: {reason} | |")
        elif command.text in measured_results:
            result = measured_results[command.text]
            if "failed" in result:
                lines.append(
                    f"| {command.line} | `{text}` | **failed** after {duration(result['cpu_s'])}: "
                    f"{result['failed']} | |"
                )
                continue
            lines.append(f"| {command.line} | `{text}` | {duration(result['cpu_s'])} | {duration(result['wall_s'])} |")
        else:
            lines.append(f"| {command.line} | `{text}` | not measured yet | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=[], help="measure only commands containing one of these")
    parser.add_argument("--report", action="store_true", help="print the table of what is measured and stop")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
    else:
        run(args.only)


if __name__ == "__main__":
    main()
