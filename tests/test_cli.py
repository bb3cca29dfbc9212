"""The `lightning-meta` command, run as a user runs it (subprocesses)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lightning_meta import MetaLearningModule
from lightning_meta.algorithms import FOMAML, MAML, Reptile

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SINUSOID = ["--config", str(ROOT / "configs/sinusoid.yaml")]
QUICK = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_val_tasks=4",
    "--data.init_args.num_test_tasks=6",
]


def run(
    *args: str, cwd: Path, extra_path: Path | None = None, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    result = subprocess.run(
        ["lightning-meta", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        pytest.fail(f"lightning-meta {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def saved_config(root: Path) -> dict:
    (config,) = root.glob("lightning_logs/version_*/config.yaml")
    return yaml.safe_load(config.read_text())


@pytest.mark.parametrize("name, cls", [("MAML", MAML), ("FOMAML", FOMAML), ("Reptile", Reptile)])
def test_algorithm_swaps_by_class_name(tmp_path, name, cls):
    result = run(
        "fit",
        "--config",
        str(ROOT / "configs/sinusoid.yaml"),
        f"--model.algorithm={name}",
        "--model.algorithm.inner_lr=0.02",
        f"--trainer.default_root_dir={tmp_path}",
        *QUICK,
        cwd=tmp_path,
    )
    algorithm = saved_config(tmp_path)["model"]["algorithm"]
    assert algorithm["class_path"] == f"{cls.__module__.rsplit('.', 1)[0]}.{name}"
    assert algorithm["init_args"]["inner_lr"] == 0.02
    assert "test/query_loss_post = " in result.stdout + result.stderr  # fit ends by testing
    (checkpoint,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint)  # CLI hparams, weights_only default
    assert type(loaded.algorithm) is cls and loaded.algorithm.inner_lr == 0.02


def test_user_subclass_by_dotted_path(tmp_path):
    (tmp_path / "my_algos.py").write_text(
        textwrap.dedent("""
        from lightning_meta.algorithms import MAML

        class AnnealedMAML(MAML):
            def __init__(self, inner_lr: float = 0.01, inner_steps: int = 1, decay: float = 0.5) -> None:
                super().__init__(inner_lr, inner_steps)
                self.decay = decay
                print(f"AnnealedMAML built with decay={decay}")
    """)
    )
    result = run(
        "fit",
        "--model.algorithm=my_algos.AnnealedMAML",
        "--model.algorithm.decay=0.25",
        "--test_after_fit=false",
        f"--trainer.default_root_dir={tmp_path}",
        *QUICK,
        cwd=tmp_path,
        extra_path=tmp_path,
    )
    assert "AnnealedMAML built with decay=0.25" in result.stdout


def test_validate_and_test_from_checkpoint_report_ci(tmp_path):
    run("fit", *SINUSOID, "--test_after_fit=false", f"--trainer.default_root_dir={tmp_path}", *QUICK, cwd=tmp_path)
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    for subcommand in ("validate", "test"):
        result = run(
            subcommand,
            *SINUSOID,
            "--ckpt_path",
            str(checkpoint),
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.num_val_tasks=4",
            "--data.init_args.num_test_tasks=6",
            cwd=tmp_path,
        )
        output = result.stdout + result.stderr
        stage = "val" if subcommand == "validate" else "test"
        assert f"{stage}/query_loss_post_ci95" in output
    assert "test/query_loss_post = " in output and "± " in output and "(6 episodes)" in output


def test_python_dash_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_meta", "fit", "--print_config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)  # the embedded default: the LM quick start
    assert config["model"]["algorithm"]["class_path"].endswith(".FOMAML")
    assert config["data"]["class_path"].endswith(".LanguageModelingTasksDataModule")


def test_unknown_algorithm_lists_known_names(tmp_path):
    result = run("fit", *SINUSOID, "--model.algorithm=MAMLL", cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "Known algorithms: FOMAML, MAML, ProtoNet, Reptile" in result.stderr


def test_bad_inner_steps_names_the_fix(tmp_path):
    result = run("fit", *SINUSOID, "--model.algorithm.inner_steps=0", *QUICK, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "inner_steps must be an integer >= 1, got 0" in result.stderr


def _config_case(config: Path):
    """Configs naming an installed data package (``pkg:NAME``) run only where it is installed, marked slow."""
    packages = re.findall(r"pkg:(\w+)", config.read_text())
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    marks = [pytest.mark.slow] if packages else []
    if missing:
        marks.append(pytest.mark.skip(reason=f"needs the data package(s) {missing}"))
    return pytest.param(config, id=config.name, marks=marks)


# A 135M-parameter model on 2 CPU cores: shorter sequences, fewer steps.
EXTRA = {
    "lm_fomaml_lora_smollm2.yaml": [
        "--data.init_args.block_size=32",
        "--trainer.max_steps=2",
        "--data.init_args.num_test_tasks=2",
        "--data.init_args.num_val_tasks=2",
    ]
}


@pytest.mark.parametrize("config", [_config_case(config) for config in CONFIGS])
def test_every_config_runs(tmp_path, config):
    extra = EXTRA.get(config.name, [])
    run("fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", *QUICK, *extra, cwd=tmp_path,
        timeout=900)  # fmt: skip
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.startswith("2.13.0")
