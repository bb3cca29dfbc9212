"""``benchmarks/readme_times/run.py``: a command's CPU time counts every process it starts, a rank that outlives
its launcher included (the DDP/FSDP rows once counted rank 0 only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[2] / "benchmarks" / "readme_times" / "run.py"

# A child that starts a grandchild busy for ~0.6 CPU seconds and exits at once, leaving it running (as a DDP
# launcher may exit before its other rank): the grandchild's time is counted only if this process reaps it.
PROBE = """
import importlib.util, subprocess, sys
spec = importlib.util.spec_from_file_location("readme_times_run", {run!r})
run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run)
if {adopt}:
    run.adopt_orphans()
busy = "import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass"
launcher = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', {{busy!r}}])".format(busy=busy)
subprocess.run([sys.executable, "-c", launcher], check=True)
run.reap_orphans()
print(run.cpu_seconds())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_the_cpu_time_of_a_process_that_outlives_its_launcher_is_counted():
    def counted(adopt: bool) -> float:
        script = PROBE.format(run=str(RUN), adopt=adopt)
        return float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)

    assert counted(adopt=True) >= 0.55
    assert counted(adopt=False) < 0.5  # reaped by init: lost, as the DDP rows were
