"""Checkpoints: safe, local reading; tokenizer fingerprints; a resumable checkpoint on SIGTERM."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_meta import MLP, CausalLMLearner, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML
from lightning_meta.datamodules import LanguageModelingTasksDataModule, SinusoidDataModule
from lightning_meta.training.checkpoints import SIGTERM_EXIT_CODE, CheckpointError, load_checkpoint_file

TOKENIZER = "embedded-bpe-512"
TINY_GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}


def sinusoid() -> SinusoidDataModule:
    return SinusoidDataModule(meta_batch_size=2, batches_per_epoch=20, num_val_tasks=2, num_test_tasks=2)


def fitted_checkpoint(tmp_path, steps: int = 2) -> str:
    torch.manual_seed(0)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    trainer = L.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, sinusoid())
    path = str(tmp_path / "good.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_unreadable_checkpoints_are_refused_by_name(tmp_path):
    good = fitted_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(good, "rb").read()[:3000])
    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(random.Random(0).randbytes(5000))  # fixed: no accidental zip signature
    cases = [
        ("https://example.com/model.ckpt", r"is not a local path\. Checkpoints are never downloaded"),
        (str(tmp_path / "missing.ckpt"), r"missing\.ckpt' does not exist"),
        ("last", r"'last' names the trainer's own last checkpoint .*here give the path of a \.ckpt file"),
        (str(truncated), r"truncated\.ckpt' is not a readable checkpoint \(3000 bytes\): it is truncated"),
        (str(random_bytes), r"random\.ckpt' cannot be loaded safely"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            MetaLearningModule.load_from_checkpoint(path)
        # torch's own advice for such files is to turn weights_only off: never pass it on.
        assert "weights_only` set to `False` will likely succeed" not in str(error.value)
    assert load_checkpoint_file(good)["global_step"] == 2
    torch.save({"not": "a checkpoint"}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint_file(tmp_path / "plain.pt")


def test_tokenizer_fingerprint_is_saved_and_a_mismatch_refused(tmp_path):
    learner = CausalLMLearner(model_config=TINY_GPT2, tokenizer=TOKENIZER)
    module = MetaLearningModule(learner, FOMAML(inner_lr=0.1))
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=16,
        shots=2,
        queries=2,
        meta_batch_size=2,
        num_val_tasks=2,
        num_test_tasks=2,
        max_tokens_per_domain=2000,
    )
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule)
    path = tmp_path / "lm.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["lightning_meta"]["tokenizer_fingerprint"]
    assert checkpoint["LanguageModelingTasksDataModule"]["tokenizer_fingerprint"] == saved
    MetaLearningModule.load_from_checkpoint(path)  # the same tokenizer: loads

    checkpoint["lightning_meta"]["tokenizer_fingerprint"] = "0" * 16  # trained on another vocabulary
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=rf"learner was trained with tokenizer '{TOKENIZER}' \(fingerprint 0{{16}}\)"):
        MetaLearningModule.load_from_checkpoint(tmp_path / "other.ckpt")
    state = datamodule.state_dict() | {"tokenizer_fingerprint": "0" * 16}
    with pytest.raises(ValueError, match=r"The checkpoint's data was trained with .* other token ids"):
        datamodule.load_state_dict(state)


class _SigtermAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path):
    def run(folder, max_steps, callbacks=(), ckpt_path=None) -> MetaLearningModule:
        torch.manual_seed(0)
        module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
            callbacks=list(callbacks),
        )
        trainer.fit(module, sinusoid(), ckpt_path=ckpt_path)
        return module

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path / "killed", 6, [_SigtermAt(3)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == SIGTERM_EXIT_CODE == 143
    (saved,) = (tmp_path / "killed").rglob("last-preempted.ckpt")
    assert torch.load(saved, weights_only=True)["global_step"] == 3
    resumed = run(tmp_path / "resumed", 6, ckpt_path=saved)
    uninterrupted = run(tmp_path / "whole", 6)
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("batches_per_epoch", [20, 3])  # stopped inside an epoch; across an epoch's end
def test_resuming_from_a_checkpoint_saved_after_fit_continues_the_stream(tmp_path, batches_per_epoch):
    def run(folder, max_steps, ckpt_path=None) -> L.Trainer:
        torch.manual_seed(0)
        module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
        data = SinusoidDataModule(
            meta_batch_size=2, batches_per_epoch=batches_per_epoch, num_val_tasks=2, num_test_tasks=2
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=folder,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    run(tmp_path / "first", 2).save_checkpoint(tmp_path / "end.ckpt")  # after fit ended, as a user would
    resumed = run(tmp_path / "resumed", 4, ckpt_path=tmp_path / "end.ckpt")
    whole = run(tmp_path / "whole", 4)
    assert resumed.datamodule.state_dict()["next_train_batch"] == whole.datamodule.state_dict()["next_train_batch"] == 4
    for (name, a), b in zip(
        resumed.lightning_module.state_dict().items(), whole.lightning_module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_disk_full_while_saving_leaves_no_truncated_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from lightning.fabric.plugins.io import torch_io

    from lightning_meta import cli

    def disk_fills_up(checkpoint, path) -> None:
        with open(path, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", disk_fills_up)
    config = Path(__file__).resolve().parents[2] / "configs" / "sinusoid.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.max_steps=2",
                "--trainer.val_check_interval=1",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.num_val_tasks=2",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "The disk is full: the checkpoint" in error and "Traceback" not in error
    assert len([line for line in error.splitlines() if line.startswith("lightning-meta: error")]) == 1
    assert [path.name for path in tmp_path.rglob("*") if path.is_file() and "ckpt" in path.name] == []


def remote_code_model(folder: Path, marker: Path) -> Path:
    """A tiny GPT-2 whose config.json maps it to its own code (``auto_map``), which writes ``marker`` when run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_GPT2, vocab_size=512)).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"}
    config |= {"model_type": "marker_gpt2", "architectures": ["MarkerModel"], "auto_map": auto_map}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "marker.py").write_text(
        textwrap.dedent(f"""
        from pathlib import Path

        from transformers import GPT2Config, GPT2LMHeadModel

        Path({str(marker)!r}).write_text("the model folder's own code ran")

        class MarkerConfig(GPT2Config):
            model_type = "marker_gpt2"

        class MarkerModel(GPT2LMHeadModel):
            config_class = MarkerConfig
    """)
    )
    return folder


def test_a_checkpoint_never_switches_on_a_model_folders_own_code(tmp_path, monkeypatch, capsys):
    from transformers import dynamic_module_utils

    from lightning_meta import cli
    from lightning_meta.datamodules import PackedTextDataModule
    from lightning_meta.handoff.export import export
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    marker = tmp_path / "code-ran"
    folder = remote_code_model(tmp_path / "remote", marker)
    learner = CausalLMLearner(model_config=TINY_GPT2, tokenizer=TOKENIZER)
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=16,
        shots=1,
        queries=1,
        meta_batch_size=1,
        num_val_tasks=1,
        num_test_tasks=1,
        max_tokens_per_domain=2000,
    )
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(MetaLearningModule(learner, FOMAML(inner_lr=0.1)), datamodule)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    # A shared checkpoint whose saved options point the learner at that folder and switch its code on.
    checkpoint = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["learner"]["init_args"] |= {
        "pretrained": str(folder),
        "model_config": None,
        "trust_remote_code": True,
    }
    del checkpoint["datamodule_hyper_parameters"]  # no class_path outside the CLI: the command line gives the data
    path = tmp_path / "asks-for-code.ckpt"
    torch.save(checkpoint, path)

    refusal = r"asks to run its pretrained model's own Python code \(learner.init_args.trust_remote_code: true\)"
    with pytest.raises(CheckpointError, match=refusal + r".*load_from_checkpoint\(\.\.\., trust_remote_code=True\)"):
        MetaLearningModule.load_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=refusal + r".*lightning-meta export --trust_remote_code=true"):
        export(str(path), str(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=refusal + r".*pretrain: --model.trust_remote_code=true"):
        CausalLMPretraining(init_from=str(path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "test",
                "--ckpt_path",
                str(path),
                "--data=LanguageModelingTasksDataModule",
                f"--data.init_args.tokenizer={TOKENIZER}",
                f"--trainer.default_root_dir={tmp_path / 'test'}",
            ]
        )
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert re.search(
        r"model.learner.init_args.trust_remote_code: true\).*"
        r"allow it yourself: --model.learner.init_args.trust_remote_code=true\.",
        error,
    )

    # A pretraining checkpoint's own option, likewise.
    pretraining = CausalLMPretraining(model_config=TINY_GPT2, tokenizer=TOKENIZER)
    packed = PackedTextDataModule(tokenizer=TOKENIZER, block_size=16, batch_size=2, max_tokens_per_domain=500)
    L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(pretraining, packed)
    pretraining.trainer.save_checkpoint(tmp_path / "pretraining.ckpt")
    saved = torch.load(tmp_path / "pretraining.ckpt", weights_only=True)
    saved["hyper_parameters"] |= {"init_from": str(folder), "model_config": None, "trust_remote_code": True}
    torch.save(saved, tmp_path / "pretraining-asks-for-code.ckpt")
    with pytest.raises(CheckpointError, match=r"\(trust_remote_code: true\).*CausalLMPretraining.load_from_checkpoint"):
        CausalLMPretraining.load_from_checkpoint(tmp_path / "pretraining-asks-for-code.ckpt")
    assert not marker.exists() and not (tmp_path / "export").exists()

    # The caller's own option: the folder's code runs, as asked.
    loaded = MetaLearningModule.load_from_checkpoint(path, trust_remote_code=True)
    assert type(loaded.learner.model).__name__ == "MarkerModel" and marker.exists()
    for name, weight in loaded.learner.state_dict().items():
        assert torch.equal(weight, checkpoint["state_dict"][f"learner.{name}"]), name
    assert (export(str(path), str(tmp_path / "export"), trust_remote_code=True) / "model.safetensors").is_file()
    pretrained = CausalLMPretraining.load_from_checkpoint(
        tmp_path / "pretraining-asks-for-code.ckpt", trust_remote_code=True
    )
    assert type(pretrained.model).__name__ == "MarkerModel"


def test_resuming_removes_the_partial_file_a_killed_save_left_beside_the_checkpoint(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from test_local_files import kill_while_saving

    good = fitted_checkpoint(tmp_path)
    kill_while_saving(tmp_path / "epoch=0-step=3.ckpt")  # SIGKILL during a save: its partial file stays
    assert len([path for path in tmp_path.iterdir() if ".partial-" in path.name]) == 1
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    trainer = L.Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / "resumed",
    )
    trainer.fit(module, sinusoid(), ckpt_path=good)  # saves into resumed/: the start itself removed it
    assert not [path for path in tmp_path.iterdir() if ".partial-" in path.name]


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
#: Sharded (FSDP2) checkpoints are folders; a link to one is not tested here, so that config keeps a copy.
SHARDED = {"lm_fomaml_fsdp.yaml"}


def checkpoint_callbacks(config: Path) -> list[dict]:
    import yaml

    callbacks = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("callbacks") or []
    return [
        callback.get("init_args") or {} for callback in callbacks if callback["class_path"].endswith("ModelCheckpoint")
    ]


@pytest.mark.parametrize("config", [config for config in CONFIGS if config.name not in SHARDED], ids=lambda c: c.name)
def test_shipped_configs_keep_last_as_a_link_not_a_copy(config):
    """The quick start left three identical 11 MB files at its last step: the best, last.ckpt and latest-step."""
    saving_last = [options for options in checkpoint_callbacks(config) if options.get("save_last")]
    assert len(saving_last) <= 1, "two callbacks would each write a last.ckpt"
    assert all(options["save_last"] == "link" for options in saving_last)
    assert all("monitor" not in options for options in saving_last), "last would link to the best, not the newest"


def test_last_is_a_link_to_the_newest_file_and_loads(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    (best, newest) = checkpoint_callbacks(CONFIGS[[config.name for config in CONFIGS].index("sinusoid.yaml")])
    callbacks = [ModelCheckpoint(**best), ModelCheckpoint(**newest | {"every_n_train_steps": 2})]
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(inner_lr=0.01))
    trainer.fit(module, sinusoid())
    folder = tmp_path / "lightning_logs/version_0/checkpoints"
    last = folder / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (folder / "latest-step4.ckpt").resolve()
    assert sorted(path.name for path in folder.iterdir() if not path.is_symlink())[-1] == "latest-step4.ckpt"
    assert MetaLearningModule.load_from_checkpoint(last).algorithm.inner_lr == 0.01
    assert load_checkpoint_file(last)["global_step"] == 4


def test_the_checkpoint_writers_keep_their_earlier_import_path():
    """Configs and scripts of earlier versions name ``lightning_meta.training.checkpoints.PreemptionCheckpoint``."""
    from lightning_meta.training import checkpoints, preemption

    for name in ("PreemptionCheckpoint", "AtomicCheckpointIO", "SIGTERM_EXIT_CODE"):
        assert getattr(checkpoints, name) is getattr(preemption, name)
