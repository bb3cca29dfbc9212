"""Two nodes of one process each (torchrun with a localhost rendezvous, gloo) train as one process does.

Both nodes run on this machine as two concurrent ``torchrun --nnodes=2 --nproc-per-node=1`` launches,
one per ``--node-rank``; Lightning reads torchrun's environment (``Trainer(num_nodes=2, devices=1,
strategy="ddp")``). The weights after a few meta-training steps and the validation figures must equal one
process training on both nodes' tasks: the reference of ``test_distributed.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "workers"))
import multinode_worker as worker  # noqa: E402
from test_distributed import TOLERANCE, reference  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(Path(worker.__file__)),
                str(out),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{output[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", worker.CASES)
@pytest.mark.xdist_group("test_multinode.two_node_run")
def test_two_nodes_train_as_one_process(two_node_run, case):
    result = torch.load(two_node_run / f"{case}.pt", weights_only=True)
    assert (result["num_nodes"], result["world_size"]) == (2, 2)  # two nodes, not one node of two processes
    weights, figures, _ = reference(case)
    assert result["weights"].keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(result["weights"][name], tensor, **TOLERANCE, msg=f"two nodes {case} {name}")
    assert figures.keys() == result["figures"].keys() and figures
    for name, value in figures.items():
        assert result["figures"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), f"two nodes {case} {name}"
