"""The quick start on a shared CPU: thread settings, alone and beside a busy process.

Runs a shortened ``lightning-meta fit`` (the embedded quick start, ``--steps`` training steps, a
small validation and test set) in a fresh subprocess for each measurement, under each thread
setting, alone and beside a busy neighbour: a torch matmul loop with torch's default threads (the
realistic neighbour: another training job or test suite) and a pure-Python loop (one busy core).
Settings and neighbours alternate in a fixed cycle, repeated ``--repeats`` times; the table gives
medians of the wall time of the whole command and of training steps per second (steps after the
first ``WARMUP_STEPS``, validation and data loading excluded), each as a ratio to one thread alone
measured in the same run. A run slower than ``--timeout_factor`` times one thread alone is stopped
and shown as ``>``.

    python benchmarks/speed/shared_cpu.py [--repeats 2] [--steps 24] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer

WARMUP_STEPS = 5
MARKER = "shared_cpu:"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
NEIGHBOUR_START_SECONDS = 4.0  # the neighbour imports torch and is busy before the run starts
NEIGHBOURS = {
    "alone": None,
    "beside torch matmul loop": ("import torch\na = torch.randn(512, 512)\nwhile True:\n    a = torch.tanh(a @ a)\n"),
    "beside Python busy loop": "while True:\n    pass\n",
}


class StepClock(Callback):
    """Prints training steps per second (after the first ``WARMUP_STEPS``) and the torch thread count."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        measured = self.step_seconds[WARMUP_STEPS:]
        print(f"{MARKER} steps_per_second={len(measured) / sum(measured):.4f} threads={torch.get_num_threads()}")


@dataclass
class Setting:
    """A row of the table: thread variables set in the command's environment (none: the CLI's default)."""

    name: str
    environment: dict[str, str]


@dataclass
class Run:
    """One measured command: wall seconds (``None`` when stopped at the time limit) and its StepClock line."""

    wall_seconds: float | None
    steps_per_second: float | None = None
    threads: int | None = None
    load_before: float = 0.0


def thread_settings(cores: int) -> list[Setting]:
    """The settings compared, without duplicates on machines where two coincide (``cores // 2 == 1``)."""
    settings = [
        Setting("lightning-meta default (no variables)", {}),
        Setting("1 thread", {"OMP_NUM_THREADS": "1"}),
        Setting(f"{cores} threads (torch's default)", {"OMP_NUM_THREADS": str(cores)}),
        Setting(
            f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
        ),
    ]
    if cores // 2 not in (1, cores):
        settings.append(Setting(f"{cores // 2} threads (half the cores)", {"OMP_NUM_THREADS": str(cores // 2)}))
    return settings


def quick_start_command(steps: int, root_dir: str) -> list[str]:
    """The README's ``lightning-meta fit``, shortened to ``steps`` training steps and a small val/test set."""
    return [
        sys.executable,
        "-m",
        "lightning_meta",
        "fit",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={max(1, steps // 2)}",
        "--data.init_args.num_val_tasks=4",
        "--data.init_args.num_test_tasks=8",
        f"--trainer.default_root_dir={root_dir}",
        f"--trainer.callbacks+={Path(__file__).stem}.StepClock",  # imported from PYTHONPATH
    ]


def child_environment(setting: Setting) -> dict[str, str]:
    """This process's environment without thread variables, then the setting's, and this folder importable."""
    environment = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
    environment.update(setting.environment)
    here = str(Path(__file__).resolve().parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [here, environment.get("PYTHONPATH")]))
    return environment


def measure(setting: Setting, neighbour_code: str | None, steps: int, timeout_seconds: float | None) -> Run:
    """Runs the shortened quick start once, beside ``neighbour_code`` when given."""
    neighbour = None
    if neighbour_code is not None:
        neighbour_environment = {key: value for key, value in os.environ.items() if key not in THREAD_VARIABLES}
        neighbour = subprocess.Popen([sys.executable, "-c", neighbour_code], env=neighbour_environment)
        time.sleep(NEIGHBOUR_START_SECONDS)
    try:
        with tempfile.TemporaryDirectory(prefix="shared-cpu-") as root_dir:
            load_before = os.getloadavg()[0]
            started = time.perf_counter()
            child = subprocess.Popen(
                quick_start_command(steps, root_dir),
                env=child_environment(setting),
                cwd=root_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                output, _ = child.communicate(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.communicate()
                return Run(None, load_before=load_before)
            wall_seconds = time.perf_counter() - started
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{setting.name}: the quick start exited with {child.returncode}:\n{output[-3000:]}")
    clock_line = next(line for line in output.splitlines() if line.startswith(MARKER))
    values = dict(item.split("=") for item in clock_line.removeprefix(MARKER).split())
    return Run(wall_seconds, float(values["steps_per_second"]), int(values["threads"]), load_before)


def median(values: list[float | None]) -> float:
    """The median, with runs stopped at the time limit (``None``) counted as infinitely slow."""
    return statistics.median(float("inf") if value is None else value for value in values)


def table(settings: list[Setting], cells: dict[tuple[str, str], list[Run]], timeout_seconds: float) -> str:
    """Markdown: per setting and neighbour, median wall seconds and steps/s, and their ratios to 1 thread alone."""
    reference = cells[("1 thread", "alone")]
    reference_wall = median([run.wall_seconds for run in reference])
    reference_rate = statistics.median(run.steps_per_second or 0.0 for run in reference)
    header = "| threads | " + " | ".join(NEIGHBOURS) + " |"
    lines = [header, "|---" * (len(NEIGHBOURS) + 1) + "|"]
    for setting in settings:
        entries = []
        for neighbour in NEIGHBOURS:
            runs = cells[(setting.name, neighbour)]
            wall = median([run.wall_seconds for run in runs])
            if wall == float("inf"):
                entries.append(f"> {timeout_seconds:.0f} s (> {timeout_seconds / reference_wall:.1f}×)")
                continue
            rate = statistics.median(run.steps_per_second or 0.0 for run in runs)
            entries.append(
                f"{wall:.0f} s ({wall / reference_wall:.2f}×); {rate:.2f} steps/s ({reference_rate / rate:.2f}×)"
            )
        lines.append(f"| {setting.name} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="training steps of each run")
    parser.add_argument("--repeats", type=int, default=2, help="cycles over all settings and neighbours")
    parser.add_argument(
        "--timeout_factor", type=float, default=3.0, help="stop a run slower than this × one thread alone"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 steps, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 8, 1
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")
    cores = len(os.sched_getaffinity(0))
    settings = thread_settings(cores)
    one_thread = next(setting for setting in settings if setting.name == "1 thread")
    print(f"{cores} cores; {args.steps} steps per run; {args.repeats} repeats", flush=True)
    started = time.perf_counter()
    # The time limit comes from one thread alone, measured once before the cycles (not in the table).
    timeout_seconds = args.timeout_factor * measure(one_thread, None, args.steps, None).wall_seconds
    cells: dict[tuple[str, str], list[Run]] = {
        (setting.name, neighbour): [] for setting in settings for neighbour in NEIGHBOURS
    }
    for repeat in range(args.repeats):
        for neighbour, code in NEIGHBOURS.items():
            for setting in settings:
                run = measure(setting, code, args.steps, timeout_seconds)
                cells[(setting.name, neighbour)].append(run)
                wall = "stopped" if run.wall_seconds is None else f"{run.wall_seconds:.1f} s"
                print(
                    f"repeat {repeat} | {neighbour} | {setting.name}: {wall}, {run.steps_per_second} steps/s, "
                    f"threads {run.threads}, load before {run.load_before:.2f}",
                    flush=True,
                )
    print()
    print(table(settings, cells, timeout_seconds))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
