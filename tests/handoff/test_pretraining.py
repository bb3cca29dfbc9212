"""Pretraining from a meta-learned model: same start from an export or its checkpoint, exact resume, DDP/FSDP."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from lightning_meta.datamodules import PackedTextDataModule
from lightning_meta.handoff.export import PROVENANCE_FILE, ExportCallback, export
from lightning_meta.handoff.pretraining import CausalLMPretraining
from lightning_meta.training.checkpoints import CheckpointError

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "datamodules"))
from test_export import TINY, meta_checkpoint, quiet_trainer, tokens  # noqa: E402
from test_packed_text import write_corpus  # noqa: E402


class RecordLosses(L.Callback):
    """The training loss of every step, and the block numbers each rank read (written to ``folder``)."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.losses: dict[int, float] = {}
        self.blocks: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.blocks += batch["block_index"].tolist() if "block_index" in batch else []

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.folder is not None:
            Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(self.blocks))


@pytest.fixture(scope="module")
def handoff(tmp_path_factory):
    """A meta-training checkpoint, its export and a folder corpus."""
    folder = tmp_path_factory.mktemp("handoff")
    checkpoint, _ = meta_checkpoint(folder)
    return checkpoint, export(str(checkpoint), str(folder / "export")), folder / "corpus"


def pretrain(corpus: Path, root: Path, max_steps: int, ckpt_path=None, callbacks=(), **module_options):
    L.seed_everything(0, verbose=False)
    module = CausalLMPretraining(optimizer=functools.partial(torch.optim.AdamW, lr=0.01), **module_options)
    data = PackedTextDataModule(corpus=str(corpus), block_size=16, batch_size=16, seed=1, tokenizer=module.tokenizer)
    record = RecordLosses()
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    trainer = quiet_trainer(
        root, max_steps=max_steps, callbacks=[record, *callbacks], enable_checkpointing=checkpointing
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return record, module, trainer


@pytest.mark.xdist_group("test_pretraining.handoff")
def test_from_export_and_from_checkpoint_give_identical_first_steps(handoff, tmp_path):
    checkpoint, folder, corpus = handoff
    from_folder, module, _ = pretrain(corpus, tmp_path / "a", 2, init_from=str(folder))
    from_checkpoint, _, _ = pretrain(corpus, tmp_path / "b", 2, init_from=str(checkpoint))
    assert from_folder.losses == from_checkpoint.losses and len(from_folder.losses) == 2
    assert module.tokenizer == str(folder)  # the export's own tokenizer by default


def test_a_slim_lora_checkpoint_pretrains_every_weight_as_its_export_does(tmp_path):
    """Merged LoRA weights came out frozen (the base was): `element 0 of tensors does not require grad`."""
    from lightning_meta import CausalLMLearner, LoraSettings

    L.seed_everything(1, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(tmp_path / "base")
    checkpoint, _ = meta_checkpoint(tmp_path, pretrained=str(tmp_path / "base"), lora=LoraSettings(r=2, alpha=4))
    folder = export(str(checkpoint), str(tmp_path / "export"))
    from_checkpoint, module, _ = pretrain(
        tmp_path / "corpus", tmp_path / "a", 2, init_from=str(checkpoint), tokenizer="embedded-bpe-4096"
    )
    from_export, _, _ = pretrain(
        tmp_path / "corpus", tmp_path / "b", 2, init_from=str(folder), tokenizer="embedded-bpe-4096"
    )
    assert all(weight.requires_grad for weight in module.parameters())
    assert len(from_checkpoint.losses) == 2
    for step, loss in from_export.losses.items():  # merged W + BA: equal to rounding
        assert loss == pytest.approx(from_checkpoint.losses[step], rel=1e-5)


def test_mid_epoch_resume_reproduces_the_uninterrupted_losses(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    options = {"model_config": dict(TINY), "tokenizer": "embedded-bpe-4096"}
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    full, module, trainer = pretrain(corpus, tmp_path / "full", 40, callbacks=[every], **options)
    per_epoch = trainer.datamodule.batches_per_epoch()
    assert 10 < per_epoch < 30, per_epoch  # step 10 inside epoch 0, step 30 inside epoch 1
    for step in (10, 30):
        resumed, resumed_module, _ = pretrain(
            corpus, tmp_path / f"from{step}", 40, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt", **options
        )
        assert resumed.losses == {k: v for k, v in full.losses.items() if k > step}
        for name, weight in module.state_dict().items():
            assert torch.equal(weight, resumed_module.state_dict()[name]), name


def test_resume_from_a_checkpoint_saved_after_fit_continues_the_stream(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    options = {"model_config": dict(TINY), "tokenizer": "embedded-bpe-4096"}
    _, _, first = pretrain(corpus, tmp_path / "first", 3, **options)
    first.save_checkpoint(tmp_path / "end.ckpt")  # after fit ended (Lightning has closed epoch 0)
    full, module, _ = pretrain(corpus, tmp_path / "full", 6, **options)
    resumed, resumed_module, _ = pretrain(corpus, tmp_path / "resumed", 6, ckpt_path=tmp_path / "end.ckpt", **options)
    assert resumed.losses == {step: loss for step, loss in full.losses.items() if step > 3}
    for name, weight in module.state_dict().items():
        assert torch.equal(weight, resumed_module.state_dict()[name]), name


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    import signal

    class SigtermAtStep2(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    corpus = write_corpus(tmp_path / "corpus")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            pretrain(
                corpus,
                tmp_path / "run",
                5,
                callbacks=[SigtermAtStep2(), ModelCheckpoint(tmp_path / "ckpt")],
                model_config=dict(TINY),
                tokenizer="embedded-bpe-4096",
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 143
    assert torch.load(tmp_path / "ckpt" / "last-preempted.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.xdist_group("test_pretraining.handoff")
def test_export_pretrain_export_chain_keeps_provenance(handoff, tmp_path):
    checkpoint, folder, corpus = handoff
    callback = ExportCallback(str(tmp_path / "in-run"), overwrite=True)
    _, module, trainer = pretrain(corpus, tmp_path, 3, callbacks=[callback], init_from=str(folder))
    trainer.save_checkpoint(tmp_path / "pretrain.ckpt")
    offline = export(str(tmp_path / "pretrain.ckpt"), str(tmp_path / "offline"))
    with torch.no_grad():
        expected = module.eval().model(input_ids=tokens()).logits
        for output in (offline, tmp_path / "in-run"):
            assert torch.equal(AutoModelForCausalLM.from_pretrained(output)(input_ids=tokens()).logits, expected)
    provenance = json.loads((offline / PROVENANCE_FILE).read_text())
    assert provenance["module"] == "CausalLMPretraining" and provenance["steps_trained"] == 3
    assert provenance["initial_provenance"]["algorithm"]["class_path"].endswith("FOMAML")


@pytest.mark.xdist_group("test_pretraining.handoff")
def test_bad_starts_are_named(handoff, tmp_path):
    checkpoint, folder, _ = handoff
    with pytest.raises(ValueError, match="fingerprint"):
        CausalLMPretraining(init_from=str(folder), tokenizer="embedded-wordpiece-4096")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        CausalLMPretraining(init_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        CausalLMPretraining(init_from=str(tmp_path / "nothing.ckpt"))
    with pytest.raises(ValueError, match="exactly one of init_from"):
        CausalLMPretraining()


@pytest.mark.xdist_group("test_pretraining.handoff")
def test_blocks_longer_than_the_model_reads_are_refused(handoff, tmp_path):
    _, folder, corpus = handoff
    module = CausalLMPretraining(init_from=str(folder))  # 64 positions
    data = PackedTextDataModule(corpus=str(corpus), tokenizer=str(folder), block_size=128, batch_size=2)
    with pytest.raises(ValueError, match="block_size=128 is longer than the model's 64 positions"):
        quiet_trainer(tmp_path).fit(module, data)


def run_cli(config: dict, root: Path, timeout: int = 300) -> None:
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    result = subprocess.run(
        ["lightning-meta", "pretrain", "--config", str(path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def distributed_config(root: Path, corpus: Path, strategy, callbacks: list) -> dict:
    return {
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": strategy,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(root / "run"),
            "callbacks": callbacks,
        },
        "model": {"model_config": dict(TINY), "tokenizer": "embedded-bpe-4096"},
        "data": {
            "class_path": "PackedTextDataModule",
            "init_args": {"corpus": str(corpus), "block_size": 16, "batch_size": 8},
        },
    }


@pytest.mark.slow
def test_ddp_ranks_read_different_blocks_that_cover_the_data(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    config = distributed_config(
        tmp_path,
        corpus,
        "ddp",
        [
            {"class_path": "test_pretraining.RecordLosses", "init_args": {"folder": str(tmp_path)}},
        ],
    )
    config["trainer"] |= {"max_epochs": 1, "enable_checkpointing": False, "limit_val_batches": 0}
    run_cli(config, tmp_path)
    first, second = (set(json.loads((tmp_path / f"rank{rank}.json").read_text())) for rank in (0, 1))
    data = PackedTextDataModule(tokenizer="embedded-bpe-4096", corpus=str(corpus), block_size=16, batch_size=8)
    data.setup("fit")
    blocks = len(data.blocks["train"])
    assert not first & second
    assert len(first) == len(second) == blocks // 2
    assert first | second <= set(range(blocks)) and len(first | second) >= blocks - 1


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_exports_what_the_run_exported(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    strategy = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    config = distributed_config(
        tmp_path,
        corpus,
        strategy,
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(tmp_path / "ckpt")},
            },
            {
                "class_path": "lightning_meta.handoff.export.ExportCallback",
                "init_args": {"output_dir": str(tmp_path / "in-run")},
            },
        ],
    )
    config["trainer"] |= {"max_steps": 3, "val_check_interval": 3}
    run_cli(config, tmp_path)
    (sharded,) = (tmp_path / "ckpt").iterdir()
    assert sharded.is_dir() and (sharded / ".metadata").is_file()
    output = export(str(sharded), str(tmp_path / "offline"))
    with torch.no_grad():
        offline = AutoModelForCausalLM.from_pretrained(output)(input_ids=tokens()).logits
        in_run = AutoModelForCausalLM.from_pretrained(tmp_path / "in-run")(input_ids=tokens()).logits
    assert torch.equal(offline, in_run)
    assert json.loads((output / PROVENANCE_FILE).read_text())["steps_trained"] == 3
    damaged = tmp_path / "damaged"
    shutil.copytree(sharded, damaged)
    next(damaged.glob("*.distcp")).unlink()
    with pytest.raises(CheckpointError, match="missing 1 of its 2 shard files"):
        export(str(damaged), str(tmp_path / "never"))


def test_streaming_resume_reproduces_the_uninterrupted_losses(tmp_path):
    rows = [{"text": " ".join(f"line {i} of document {d}." for i in range(d % 9 + 2))} for d in range(20)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(root, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        module = CausalLMPretraining(model_config=dict(TINY), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
        data = PackedTextDataModule(
            tokenizer="embedded-bpe-4096",
            corpus=str(corpus),
            streaming=True,
            block_size=16,
            batch_size=4,
            val_fraction=0,
        )
        record = RecordLosses()
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=9, save_top_k=-1, filename="{step}")
        trainer = quiet_trainer(root, max_steps=24, callbacks=[record, every], enable_checkpointing=True)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return record.losses

    full = run(tmp_path / "full")  # 20 short documents: the stream wraps around into later passes
    resumed = run(tmp_path / "resumed", ckpt_path=tmp_path / "ckpt" / "step=18.ckpt")
    assert resumed == {step: loss for step, loss in full.items() if step > 18}


@pytest.mark.xdist_group("test_pretraining.handoff")
def test_export_callback_also_exports_each_best_validation(handoff, tmp_path):
    _, folder, corpus = handoff
    callback = ExportCallback(str(tmp_path / "last"), best_dir=str(tmp_path / "best"), monitor="val/loss")
    L.seed_everything(0, verbose=False)
    module = CausalLMPretraining(init_from=str(folder))
    data = PackedTextDataModule(corpus=str(corpus), tokenizer=str(folder), block_size=16, batch_size=16)
    trainer = quiet_trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=None, callbacks=[callback])
    trainer.fit(module, data)
    best = json.loads((tmp_path / "best" / PROVENANCE_FILE).read_text())
    assert best["validation"]["val/loss"] == pytest.approx(callback._best)
    assert best["steps_trained"] in (2, 4) and (tmp_path / "last" / "model.safetensors").is_file()


def bad_model_folders(root: Path) -> dict[str, tuple[Path, str]]:
    """Model folders transformers cannot load as they are, and the message each must give."""
    custom = root / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": auto_map}))
    (custom / "evil.py").write_text(f"open({str(root / 'code-ran')!r}, 'w').write('ran')\n")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gpt2", ')
    unknown = root / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "notamodel"}')
    return {
        "custom": (custom, r"holds its own model code \(auto_map in config.json\).*--model.trust_remote_code=true"),
        "broken": (broken, "has a config.json that is not valid JSON"),
        "unknown": (unknown, "model_type 'notamodel', which is not a model type transformers has"),
    }


@pytest.mark.parametrize("case", ["custom", "broken", "unknown"])
def test_model_folders_transformers_cannot_load_get_one_line_errors(tmp_path, monkeypatch, capsys, case):
    import io
    import re

    from lightning_meta import cli

    folder, message = bad_model_folders(tmp_path)[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))  # transformers' prompt must never be asked
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrain", f"--model.init_from={folder}", "--data=PackedTextDataModule", "--trainer.logger=false"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error and "upgrade" not in error, error
    assert not (tmp_path / "code-ran").exists()


def test_a_learner_model_folder_with_its_own_code_names_the_fit_option(tmp_path, monkeypatch):
    import io

    from lightning_meta.learners import CausalLMLearner

    folder, _ = bad_model_folders(tmp_path)["custom"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 5))
    # fit reads the learner's option under model.learner.init_args, not pretrain's model.trust_remote_code.
    with pytest.raises(ValueError, match=r"fit: --model\.learner\.init_args\.trust_remote_code=true; pretrain: "):
        CausalLMLearner(pretrained=str(folder))
    assert not (tmp_path / "code-ran").exists()


def test_one_tokenizer_under_two_names_names_the_fix(tmp_path, capsys):
    from lightning_meta import cli
    from lightning_meta.data.tokenization import load_tokenizer

    # As the README's pretrain_from_meta.yaml with --model.init_from=CKPT: the model's tokenizer by its
    # name, the data's by an export folder holding the same tokenizer.
    load_tokenizer("embedded-bpe-4096").save_pretrained(tmp_path / "export")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "pretrain",
                f"--model.model_config={json.dumps(TINY)}",
                "--model.tokenizer=embedded-bpe-4096",
                "--data=PackedTextDataModule",
                f"--data.init_args.tokenizer={tmp_path / 'export'}",
                f"--data.init_args.corpus={write_corpus(tmp_path / 'corpus')}",
                "--data.init_args.block_size=16",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "the same token ids under two names" in error and "--data.init_args.tokenizer=embedded-bpe-4096" in error
    assert "Traceback" not in error and "merging hparams" not in error


def test_an_untied_head_survives_export_pretrain_export(tmp_path):
    # configs/control_maml_tiny.yaml adapts an output head of its own (tie_word_embeddings false): the hand-off
    # must start pretraining from that head, train it apart from the input embeddings, and export it so.
    untied = dict(TINY, tie_word_embeddings=False)
    checkpoint, learner = meta_checkpoint(tmp_path, model_config=untied, fast_weights="head")
    folder = export(str(checkpoint), str(tmp_path / "export"))
    _, module, trainer = pretrain(tmp_path / "corpus", tmp_path / "pre", 2, init_from=str(folder))
    model = module.model
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    trainer.save_checkpoint(tmp_path / "pre.ckpt")
    again = AutoModelForCausalLM.from_pretrained(export(str(tmp_path / "pre.ckpt"), str(tmp_path / "export2")))
    assert not again.config.tie_word_embeddings
    assert torch.equal(again.lm_head.weight, model.lm_head.weight.detach())
    assert not torch.equal(again.lm_head.weight, again.get_input_embeddings().weight)
    assert not torch.equal(again.lm_head.weight, learner.model.lm_head.weight.detach())  # pretraining moved it
