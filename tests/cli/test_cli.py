"""The `lightning-meta` command, run as a user runs it (subprocesses)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from real_models import real_model_skip_reason

import lightning_meta
from lightning_meta import MetaLearningModule, cli, cli_messages
from lightning_meta.algorithms import FOMAML, MAML, Reptile

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("name, cls", [("MAML", MAML), ("FOMAML", FOMAML), ("reptile", Reptile)])  # any case
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
    assert algorithm["class_path"] == f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
    assert algorithm["init_args"]["inner_lr"] == 0.02
    assert "test/query_loss_post = " in result.stdout + result.stderr  # fit ends by testing
    (checkpoint,) = tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint)  # CLI hparams, weights_only default
    assert type(loaded.algorithm) is cls and loaded.algorithm.inner_lr == 0.02


def test_multitask_by_name_and_the_adaptation_curve_in_the_test_summary(tmp_path):
    result = run(
        "fit",
        *SINUSOID,
        "--model.algorithm=MultiTask",
        "--model.eval_curve=[0, 1, 3]",
        f"--trainer.default_root_dir={tmp_path}",
        *QUICK,
        cwd=tmp_path,
    )
    model = saved_config(tmp_path)["model"]
    assert model["algorithm"]["class_path"] == "lightning_meta.algorithms.MultiTask"
    assert model["algorithm"]["init_args"]["eval_inner_steps"] == 10 and model["eval_curve"] == [0, 1, 3]
    summary = (result.stdout + result.stderr).split("Post-adaptation results")[-1]
    assert all(f"test/query_loss_step{k} = " in summary for k in (0, 1, 3)) and "test/query_loss_post = " in summary


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
        # validate prints Lightning's table; test prints the module's summary only, not the same figures again
        # as a table of 15-digit floats
        assert ("val/query_loss_post_ci95" in output) == (subcommand == "validate")
        assert ("test/query_loss_post_ci95" in output) is False
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


def test_unknown_algorithm_gets_two_lines_with_did_you_mean_not_the_usage(tmp_path):
    result = run("fit", *SINUSOID, "--model.algorithm=MAMLL", cwd=tmp_path, check=False)
    assert result.returncode == 2
    first, known = result.stderr.strip().splitlines()
    assert first == "lightning-meta: error: unknown algorithm 'MAMLL'; did you mean MAML or FOMAML?"
    assert known.startswith(
        "Known algorithms: ANIL, FOMAML, MAML, MAMLPlusPlus, MetaICL, MetaSGD, MultiTask, ProtoNet, Reptile "
        "(any case on the command line)"
    )
    config = tmp_path / "typo.yaml"  # a name in a config file: the parser's error, the same two lines
    config.write_text("data:\n  class_path: SinusoidDataModul\n")
    result = run("fit", *SINUSOID, "--config", str(config), cwd=tmp_path, check=False)
    assert result.returncode == 2 and "usage:" not in result.stderr
    first, known = result.stderr.strip().splitlines()
    assert first == "lightning-meta: error: unknown datamodule 'SinusoidDataModul'; did you mean SinusoidDataModule?"
    assert known.startswith("Known datamodules: ") and "TextToTextTasksDataModule" in known


def test_algorithm_and_datamodule_names_in_any_case_become_class_names():
    known = {"algorithm": cli_messages.known_algorithms(), "datamodule": cli_messages.known_datamodules()}
    given = ["fit", "--model.algorithm=reptile", "--data", "sinusoiddatamodule", "--data.init_args.ways=5"]
    assert cli_messages.with_class_names(given, known) == [
        "fit",
        "--model.algorithm=Reptile",
        "--data",
        "SinusoidDataModule",
        "--data.init_args.ways=5",
    ]
    dotted = ["fit", "--model.algorithm=my_pkg.algos.MyAlgo", "--data={class_path: x}"]
    assert cli_messages.with_class_names(dotted, known) == dotted  # left to the parser
    with pytest.raises(cli_messages.UnknownNameError, match="did you mean ProtoNet"):
        cli_messages.with_class_names(["fit", "--model.algorithm", "protonett"], known)


def test_usage_line_names_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "{fit,validate,test,predict,export,pretrain,lm-eval}" in usage


def test_version_imports_neither_torch_nor_lightning():
    """``lightning-meta --version`` took 20 s: it imported the package, hence torch and Lightning."""
    check = (
        "import sys; from lightning_meta.__main__ import main; main(['--version']); "
        "heavy = sorted({'torch', 'lightning', 'transformers'} & set(sys.modules)); assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"lightning-meta {lightning_meta.__version__}\n"


def test_bad_inner_steps_names_the_fix(tmp_path):
    result = run("fit", *SINUSOID, "--model.algorithm.inner_steps=0", *QUICK, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "inner_steps must be an integer >= 1, got 0" in result.stderr


def _config_case(config: Path):
    """Configs naming an installed data package (``pkg:NAME``) run only where it is installed, marked slow."""
    packages = re.findall(r"pkg:(\w+)", config.read_text())
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    marks = [pytest.mark.slow] if packages else []
    if config.name.startswith("bigbench_"):  # they read the BIG-bench archive from the working directory
        marks.append(pytest.mark.skip(reason="run on a tiny archive by tests/datamodules/test_task_collections.py"))
    elif missing:
        marks.append(pytest.mark.skip(reason=f"needs the data package(s) {missing}"))
    elif real_model_skip_reason(packages):
        marks.append(pytest.mark.skip(reason=real_model_skip_reason(packages)))
    elif "LitDataTextDataModule" in config.read_text() and importlib.util.find_spec("litdata") is None:
        marks.append(pytest.mark.skip(reason='needs litdata (the [stream] extra: pip install -e ".[stream]")'))
    return pytest.param(config, id=config.name, marks=marks)


# A 135M-parameter model on 2 CPU cores: shorter sequences, fewer steps, one evaluation batch (CI time).
ONE_EVALUATION_BATCH = [
    "--trainer.num_sanity_val_steps=0",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
]
EXTRA = {
    "lm_fomaml_lora_smollm2.yaml": [
        *ONE_EVALUATION_BATCH,
        "--data.init_args.block_size=32",
        "--trainer.max_steps=2",
        "--data.init_args.num_test_tasks=2",
        "--data.init_args.num_val_tasks=2",
    ],
    "pretrain_smollm2.yaml": [*ONE_EVALUATION_BATCH, "--data.init_args.block_size=32", "--trainer.max_steps=2"],
    **{
        f"gym_{method}_{model}.yaml": [
            # Three gym families (train, val, test by the default split) tokenize in a few seconds.
            "--data.init_args.gym_families=[word_map,label_permutation,string_transform]",
            *(
                [
                    *ONE_EVALUATION_BATCH,
                    "--data.init_args.max_length=48",
                    "--trainer.max_steps=2",
                    "--data.init_args.num_val_tasks=2",
                    "--data.init_args.num_test_tasks=2",
                ]
                if model == "smollm2"
                else []
            ),
            *(
                ["--model.algorithm.init_args.eval_inner_steps=1"]  # not 5 adaptation steps of 135M parameters
                if (method, model) == ("fomaml_lora", "smollm2")
                else []
            ),
        ]
        for method, model in [(m, "tiny") for m in ("metaicl", "channel_metaicl", "fomaml_lora", "multitask")]
        + [(m, "smollm2") for m in ("metaicl", "fomaml_lora")]
    },
}
# `lightning-meta pretrain` configs (pretrain_*.yaml), shortened like QUICK.
PRETRAIN_QUICK = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.max_tokens_per_domain=2000",
]


@pytest.mark.parametrize("config", [_config_case(config) for config in CONFIGS])
def test_every_config_runs(tmp_path, config):
    extra = EXTRA.get(config.name, [])
    subcommand, quick = ("pretrain", PRETRAIN_QUICK) if config.name.startswith("pretrain_") else ("fit", QUICK)
    if config.name == "pretrain_from_meta.yaml":  # it starts from the quick start's export, in exports/quickstart
        sys.path.insert(0, str(ROOT / "tests" / "handoff"))
        from test_export import TINY, meta_checkpoint

        from lightning_meta.handoff.export import export

        checkpoint, _ = meta_checkpoint(tmp_path / "meta", model_config=dict(TINY, n_positions=128))
        export(str(checkpoint), str(tmp_path / "exports" / "quickstart"))
    if config.name == "pretrain_litdata_tiny.yaml":  # it reads the LitData corpus its comment prepares
        from lightning_meta.datamodules.litdata_text import prepare_litdata_corpus

        corpus = str(tmp_path / "data" / "litdata_corpus")
        prepare_litdata_corpus(corpus, max_tokens_per_domain=2000, start_method="fork")
        quick = [option for option in quick if "max_tokens_per_domain" not in option]  # read when prepared
    # Clipping on: the divergence message advises it, and under FSDP it meets sharded and replicated gradients.
    run(
        subcommand,
        "--config",
        str(config),
        f"--trainer.default_root_dir={tmp_path}",
        *quick,
        *extra,
        "--trainer.gradient_clip_val=1.0",
        cwd=tmp_path,
        timeout=900,
    )
    assert list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))


def test_torch_is_the_pinned_cpu_build():
    assert torch.__version__.startswith("2.13.0")


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
    """One short sinusoid fit (MAML, inner_lr=0.02); its folder holds last.ckpt."""
    root = tmp_path_factory.mktemp("sinusoid-run")
    run(
        "fit",
        *SINUSOID,
        "--model.algorithm.inner_lr=0.02",
        "--test_after_fit=false",
        f"--trainer.default_root_dir={root}",
        *QUICK,
        cwd=root,
    )
    return root


@pytest.mark.xdist_group("test_cli.sinusoid_run")
def test_options_typed_with_ckpt_path_win_over_the_checkpoint(sinusoid_run, tmp_path):
    checkpoint = str(sinusoid_run / "lightning_logs/version_0/checkpoints/last.ckpt")
    evaluate = ["--ckpt_path", checkpoint, "--data.init_args.num_test_tasks=3", "--trainer.enable_progress_bar=false"]
    cases = [
        (["--model.algorithm.eval_inner_steps=1"], "MAML", {"eval_inner_steps": 1, "inner_lr": 0.02}, None),
        (["--model.eval_inner_steps=2"], "MAML", {"eval_inner_steps": 10, "inner_lr": 0.02}, 2),
        (["--model.algorithm=Reptile"], "Reptile", {"inner_lr": 0.02}, None),
    ]
    for index, (options, algorithm, init_args, eval_inner_steps) in enumerate(cases):
        root = tmp_path / str(index)
        # No --config: the checkpoint supplies the learner and the datamodule, over the defaults.
        run("test", *evaluate, *options, f"--trainer.default_root_dir={root}", cwd=tmp_path)
        config = saved_config(root)  # what ran
        assert config["model"]["algorithm"]["class_path"].endswith(f".{algorithm}")
        assert init_args.items() <= config["model"]["algorithm"]["init_args"].items()
        assert config["model"]["eval_inner_steps"] == eval_inner_steps
        assert config["data"]["init_args"]["num_test_tasks"] == 3 and config["data"]["init_args"]["shots"] == 10
    # Resuming fit with a new inner_lr trains with it, and the next checkpoint says so.
    root = tmp_path / "resumed"
    run(
        "fit",
        *SINUSOID,
        "--ckpt_path",
        checkpoint,
        "--model.algorithm.inner_lr=0.05",
        "--test_after_fit=false",
        f"--trainer.default_root_dir={root}",
        *QUICK[1:],
        "--trainer.max_steps=6",
        cwd=tmp_path,
    )
    assert saved_config(root)["model"]["algorithm"]["init_args"]["inner_lr"] == 0.05
    (resumed,) = root.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    assert MetaLearningModule.load_from_checkpoint(resumed).algorithm.inner_lr == 0.05


@pytest.mark.xdist_group("test_cli.sinusoid_run")
def test_checkpoint_of_another_learner_is_refused_by_name(sinusoid_run, tmp_path):
    checkpoint = str(sinusoid_run / "lightning_logs/version_0/checkpoints/last.ckpt")
    result = run(
        "test", "--config", str(ROOT / "configs/quickstart.yaml"), "--ckpt_path", checkpoint, cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert (
        "holds a learner of class lightning_meta.RegressionLearner, but the config asks for "
        "lightning_meta.CausalLMLearner" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.xdist_group("test_cli.sinusoid_run")
def test_bad_checkpoint_paths_get_one_line_errors(sinusoid_run, tmp_path):
    good = (sinusoid_run / "lightning_logs/version_0/checkpoints/last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(good[: len(good) // 2])
    (tmp_path / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    cases = {
        "https://example.com/x.ckpt": "is not a local path. Checkpoints are never downloaded",
        "truncated.ckpt": "'truncated.ckpt' is not a readable checkpoint",
        "random.ckpt": "'random.ckpt' cannot be loaded safely",
    }
    for path, message in cases.items():
        result = run("test", *SINUSOID, "--ckpt_path", path, cwd=tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "will likely succeed" not in result.stderr


def test_constructor_errors_are_one_message_and_name_no_algorithm_list(tmp_path):
    result = run("fit", *SINUSOID, "--model.algorithm.inner_lr=-1", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "lightning-meta: error: ValueError: inner_lr must be a finite number > 0, got -1.0" in result.stderr
    assert "Traceback" not in result.stderr and "Known algorithms" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 6
    typo = run("fit", *SINUSOID, "--model.algorithm.inner_stepz=3", cwd=tmp_path, check=False)
    assert "inner_stepz" in typo.stderr and "Known algorithms" not in typo.stderr


def test_two_runs_in_one_folder_do_not_overwrite_each_other(tmp_path):
    options = ["fit", *SINUSOID, "--trainer.logger=false", "--test_after_fit=false", *QUICK]
    run(*options, "--model.algorithm.inner_lr=0.02", cwd=tmp_path)
    second = run(*options, "--model.algorithm.inner_lr=0.03", cwd=tmp_path, check=False)
    assert second.returncode == 2
    assert "already holds the config.yaml of another run" in second.stderr
    assert "with the logger off (--trainer.logger=false)" in second.stderr
    assert "--trainer.default_root_dir" in second.stderr
    kept = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert kept["model"]["algorithm"]["init_args"]["inner_lr"] == 0.02


def test_runs_started_together_in_one_folder_get_a_version_each(tmp_path, monkeypatch, capsys):
    """Lightning chose the version by listing lightning_logs/: two runs that listed it before either created
    version_0 both took it, and the second was refused. Every listing here is that stale."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    for logger in (TensorBoardLogger, CSVLogger):
        monkeypatch.setattr(logger, "_get_next_version", lambda self: 0)
    options = ["fit", *SINUSOID, "--test_after_fit=false", *QUICK, f"--trainer.default_root_dir={tmp_path}"]
    for inner_lr in (0.02, 0.03):
        cli.main([*options, f"--model.algorithm.inner_lr={inner_lr}"])
    configs = sorted(tmp_path.glob("lightning_logs/version_*/config.yaml"))
    assert [config.parent.name for config in configs] == ["version_0", "version_1"]
    chosen = [yaml.safe_load(config.read_text())["model"]["algorithm"]["init_args"]["inner_lr"] for config in configs]
    assert chosen == [0.02, 0.03]
    given = [
        *options,
        "--trainer.logger=TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.version=0",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(given)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "already holds the config.yaml of another run" in error and "version is given (version=0)" in error
    assert "keep the logger on" not in error
    for config in configs:  # each run's event file in its own folder; the refused run left none
        assert len([path for path in config.parent.iterdir() if path.name.startswith("events.")]) == 1


@pytest.mark.parametrize("args", [["fitt"], []])
def test_a_mistyped_or_missing_subcommand_lists_every_subcommand(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    problem = "'fitt' is not a subcommand" if args else "no subcommand given"
    assert error == (
        f"lightning-meta: error: {problem}; the subcommands are fit, validate, test, predict, export, "
        "pretrain, lm-eval (lightning-meta --help)."
    )


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    (tmp_path / "killer.py").write_text(
        textwrap.dedent("""
        import os, signal
        from lightning import Callback

        class SigtermAt(Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
    """)
    )
    result = run(
        "fit",
        *SINUSOID,
        *QUICK,
        "--trainer.max_steps=6",
        "--trainer.callbacks+=killer.SigtermAt",
        cwd=tmp_path,
        extra_path=tmp_path,
        check=False,
    )
    assert result.returncode == 143  # a scheduler must not read preemption as success
    (saved,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last-preempted.ckpt")
    assert f"SIGTERM at step 3: saved a resumable checkpoint to {saved}" in result.stdout + result.stderr
    assert "test/query_loss_post" not in result.stdout + result.stderr  # no test after an interrupted fit


def test_sigterm_during_test_exits_143(tmp_path):
    (tmp_path / "killer_in_test.py").write_text(
        textwrap.dedent("""
        import os, signal
        from lightning import Callback

        class SigtermInTest(Callback):
            def on_test_batch_end(self, trainer, *args):
                os.kill(os.getpid(), signal.SIGTERM)
    """)
    )
    killer = ["--trainer.callbacks+=killer_in_test.SigtermInTest", "--data.init_args.eval_meta_batch_size=2"]
    # The test that ends fit:
    fitted = run("fit", *SINUSOID, *QUICK, *killer, cwd=tmp_path, extra_path=tmp_path, check=False)
    assert fitted.returncode == 143, fitted.stderr[-2000:]
    assert "test/query_loss_post" not in fitted.stdout
    # lightning-meta test:
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    tested = run(
        "test",
        *SINUSOID,
        *QUICK,
        *killer,
        "--ckpt_path",
        str(checkpoint),
        cwd=tmp_path,
        extra_path=tmp_path,
        check=False,
    )
    assert tested.returncode == 143, tested.stderr[-2000:]
    assert "test/query_loss_post" not in tested.stdout


def test_help_says_what_the_program_is(tmp_path):
    result = run("--help", cwd=tmp_path)
    assert "meta-learning (MAML" in result.stdout and "without --config runs the embedded quick start" in result.stdout


def _configurable_classes() -> list[type]:
    import lightning_meta.datamodules as datamodules
    from lightning_meta import algorithms, learners

    classes = [MetaLearningModule, learners.RegressionLearner, learners.ClassificationLearner]
    classes += [lightning_meta.CausalLMLearner, lightning_meta.EncoderLearner]
    classes += sorted(set(algorithms.available().values()), key=lambda cls: cls.__name__)
    classes += [getattr(datamodules, name) for name in datamodules.__all__]
    from lightning_meta.handoff.export import ExportCallback
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    classes += [CausalLMPretraining, ExportCallback]
    return classes


@pytest.mark.parametrize("cls", _configurable_classes(), ids=lambda cls: cls.__name__)
def test_every_option_has_help_text(cls):
    """`--model.help` / `--data.help` show the Args docstring; an entry jsonargparse cannot parse blanks it all."""
    import inspect

    import docstring_parser

    # jsonargparse also takes an argument's help from the base classes' docstrings.
    documented = [param for base in cls.__mro__ for param in docstring_parser.parse(base.__doc__ or "").params]
    text = " ".join(f"{param.arg_name} {param.description}" for param in documented)
    names = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")]
    undocumented = [name for name in names if name not in text]
    assert not undocumented, f"{cls.__name__}: no help text for {undocumented}"


def test_plugin_algorithm_with_its_own_meta_parameters_trains_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "step_algos.py").write_text(
        textwrap.dedent("""
        import math

        import torch
        from torch import nn

        from lightning_meta.algorithms import MAML, LearnedRates


        class LearnedStepMAML(MAML):
            \"\"\"MAML with one learned inner step size, kept positive in log space.\"\"\"

            def __init__(self, inner_lr: float = 0.01, inner_steps: int = 1) -> None:
                super().__init__(inner_lr, inner_steps)
                self.log_lr = nn.Parameter(torch.tensor(math.log(inner_lr)))

            def inner_update(self, training: bool = True):
                return LearnedRates(self.log_lr)
    """)
    )
    run(
        "fit",
        *SINUSOID,
        "--model.algorithm=step_algos.LearnedStepMAML",
        "--model.algorithm.inner_lr=0.02",
        "--model.algorithm_lr=0.05",
        "--test_after_fit=false",
        f"--trainer.default_root_dir={tmp_path}",
        *QUICK,
        cwd=tmp_path,
        extra_path=tmp_path,
    )
    (checkpoint,) = tmp_path.glob("lightning_logs/version_0/checkpoints/last.ckpt")
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]["algorithm.log_lr"]
    assert saved != pytest.approx(math.log(0.02))  # optimized by the host, in its own parameter group
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint)
    assert type(loaded.algorithm).__name__ == "LearnedStepMAML" and torch.equal(loaded.algorithm.log_lr, saved)


def _run_with_thread_variables(tmp_path: Path, **variables: str) -> str:
    """Output of a short fit, run with ``variables`` as the only thread variables, that prints torch's threads."""
    (tmp_path / "thread_count.py").write_text(
        textwrap.dedent("""
        import torch
        from lightning import Callback

        class Print(Callback):
            def on_train_start(self, trainer, pl_module):
                print(f"threads during fit: {torch.get_num_threads()}")
    """)
    )
    env = {key: value for key, value in os.environ.items() if key not in cli.THREAD_VARIABLES}
    env.update(variables, PYTHONPATH=f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}")
    result = subprocess.run(
        [
            "lightning-meta",
            "fit",
            *SINUSOID,
            *QUICK,
            "--trainer.max_steps=2",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=thread_count.Print",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    "variables, threads, source",
    [
        ({}, cli.DEFAULT_THREADS, "(lightning-meta's default; OMP_NUM_THREADS=N lightning-meta ... uses N)"),
        ({"OMP_NUM_THREADS": "2"}, 2, "(from OMP_NUM_THREADS)"),
        ({"MKL_NUM_THREADS": "2"}, 2, "(from MKL_NUM_THREADS)"),
    ],
)
def test_runs_use_one_thread_unless_the_environment_says_otherwise(tmp_path, variables, threads, source):
    output = _run_with_thread_variables(tmp_path, **variables)
    assert f"threads during fit: {threads}" in output
    assert f"torch threads: {threads} {source}" in output  # the one line that says how to change it


def test_importing_the_package_leaves_torch_threads_alone():
    env = {key: value for key, value in os.environ.items() if key not in cli.THREAD_VARIABLES}
    code = (
        "import os, torch; before = torch.get_num_threads(); import lightning_meta, lightning_meta.cli; "
        "print(before, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    before, after, variable = result.stdout.split()
    assert after == before  # torch's default, whatever this machine's is
    assert variable == "None"


def _parsed(*args: str) -> cli.MetaCLI:
    """The command's classes for ``args``, built but not run."""
    from lightning import LightningDataModule

    return cli.MetaCLI(
        MetaLearningModule,
        LightningDataModule,
        subclass_mode_data=True,
        run=False,
        parser_class=cli.MetaArgumentParser,
        auto_configure_optimizers=False,
        args=[*args, "--trainer.logger=false"],
    )


def test_data_tokenizer_follows_the_learner_unless_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = ["--config", str(ROOT / "configs/quickstart.yaml"), "--data.init_args.tokenizer=null"]
    linked = _parsed(*config, "--model.learner.init_args.tokenizer=embedded-bpe-512")
    assert linked.datamodule.tokenizer == "embedded-bpe-512"
    assert linked.config["data.init_args.tokenizer"] == "embedded-bpe-512"  # what config.yaml saves
    chosen = _parsed(*config, "--data.init_args.tokenizer=embedded-bpe-1024")
    assert chosen.datamodule.tokenizer == "embedded-bpe-1024"  # the user's own choice stays


def test_datamodule_from_python_names_the_missing_tokenizer():
    from lightning_meta.datamodules import LanguageModelingTasksDataModule, PackedTextDataModule

    for datamodule in (LanguageModelingTasksDataModule, PackedTextDataModule):
        with pytest.raises(ValueError, match=rf"^{datamodule.__name__} needs tokenizer=: the one the model reads"):
            datamodule()


def _one_line_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and "usage:" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("lightning-meta: error:")]
    return line


def test_bad_trainer_option_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    line = _one_line_error(capsys, "fit", *SINUSOID, "--trainer.max_steps=-5")
    assert line == (
        "lightning-meta: error: ValueError: --trainer options: `max_steps` must be a non-negative integer or -1 "
        "(infinite steps). You passed in -5."
    )


def test_text_option_read_as_a_mapping_says_how_to_quote_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    line = _one_line_error(
        capsys,
        "fit",
        "--config",
        str(ROOT / "configs/gym_metaicl_tiny.yaml"),
        "--data.init_args.template=Question: {input}",
    )
    assert line == (
        "lightning-meta: error: --data.init_args.template got the mapping {'Question': {'input': None}}: the command "
        "line reads this option as YAML, where ': ' and braces make a mapping. Give the text quoted inside its "
        "parent: --data.init_args=\"{template: 'Question: {input}'}\" (or in a config file: template: "
        "'Question: {input}')."
    )
    # The advice works (the shell removes the double quotes).
    advised = _parsed(
        "--config", str(ROOT / "configs/gym_metaicl_tiny.yaml"), "--data.init_args={template: 'Question: {input}'}"
    )
    assert advised.datamodule.template == "Question: {input}"
    assert advised.datamodule.shots == 4  # the config's other data options stay


def test_held_out_families_taking_every_task_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = [
        {"task": f"t{task}", "family": f"f{task % 2}", "input": f"x {example}", "output": f"y {example}"}
        for task in range(4)
        for example in range(12)
    ]
    table = tmp_path / "tasks.jsonl"
    table.write_text("\n".join(json.dumps(row) for row in rows))
    line = _one_line_error(
        capsys,
        "fit",
        "--config",
        str(ROOT / "configs/gym_metaicl_tiny.yaml"),
        f"--data.init_args.dataset={table}",
        "--data.init_args.test_families=[f0, f1]",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert line == (
        "lightning-meta: error: ValueError: test_families take every one of the 4 tasks: no training task is left. "
        "Hold out fewer (families: f0, f1), or add tasks."
    )


def test_description_names_every_algorithm_the_registry_holds():
    from lightning_meta import algorithms

    text = cli.describe(algorithms.available())
    assert all(cls.__name__ in text for cls in algorithms.BUILTIN.values())
    assert "meta-learning (MAML, FOMAML, Reptile, ProtoNet," in text
    assert "(MAML, MyPlugin)" in cli.describe({"maml": MAML, "myplugin": type("MyPlugin", (), {})})


def test_a_slim_lora_run_resumes_and_tests_with_its_own_config(tmp_path):
    """A LoRA option in the checkpoint and in --config together were a parser error; the base is found or given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny, vocab_size=512)).save_pretrained(tmp_path / "base")
    config = tmp_path / "lora.yaml"
    config.write_text(
        textwrap.dedent(f"""
        trainer: {{max_steps: 2, limit_val_batches: 0, limit_test_batches: 1, enable_progress_bar: false,
                   enable_model_summary: false, default_root_dir: {tmp_path / "runs"}}}
        model:
          learner:
            class_path: lightning_meta.CausalLMLearner
            init_args: {{pretrained: {tmp_path / "base"}, tokenizer: embedded-bpe-512, lora: {{r: 2, alpha: 4}}}}
          algorithm: {{class_path: FOMAML, init_args: {{inner_lr: 0.5, inner_steps: 1}}}}
        data:
          class_path: LanguageModelingTasksDataModule
          init_args: {{block_size: 16, shots: 1, queries: 1, meta_batch_size: 1, num_val_tasks: 1, num_test_tasks: 1,
                      max_tokens_per_domain: 2000}}
    """)
    )
    cli.main(["fit", "--config", str(config), "--test_after_fit=false"])
    (checkpoint,) = (tmp_path / "runs").rglob("*.ckpt")
    cli.main(["test", "--config", str(config), "--ckpt_path", str(checkpoint)])
    # The base moved: the fingerprint error's remedy, with the run's own config, resumes.
    (tmp_path / "base").rename(tmp_path / "moved")
    cli.main(
        [
            "fit",
            "--config",
            str(config),
            "--ckpt_path",
            str(checkpoint),
            "--trainer.max_steps=3",
            f"--model.learner.init_args.pretrained={tmp_path / 'moved'}",
            "--test_after_fit=false",
        ]
    )
    resumed = torch.load(max((tmp_path / "runs").rglob("*step=3.ckpt")), weights_only=True)
    assert resumed["global_step"] == 3 and resumed["hyper_parameters"]["learner"]["init_args"]["lora"]["r"] == 2
