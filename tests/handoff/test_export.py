"""Export: a meta-training checkpoint as a Hugging Face folder that gives the learner's logits."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_meta import CausalLMLearner, LoraSettings, MetaLearningModule
from lightning_meta.algorithms import FOMAML, MetaICL
from lightning_meta.data.local_files import current_umask
from lightning_meta.data.tokenization import fingerprint_of, load_tokenizer
from lightning_meta.datamodules import LanguageModelingTasksDataModule, TextToTextTasksDataModule
from lightning_meta.handoff.export import PROVENANCE_FILE, ExportCallback, export
from lightning_meta.training.checkpoints import REBUILT_WEIGHTS, CheckpointError

sys.path.insert(0, str(Path(__file__).parents[1] / "datamodules"))
from test_batch_padding import write_tasks  # noqa: E402
from test_packed_text import write_corpus  # noqa: E402

TINY = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def quiet_trainer(root: Path, **options) -> L.Trainer:
    settings = dict(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
    )
    return L.Trainer(**(settings | options))


def meta_checkpoint(folder: Path, callbacks=(), model_config=None, **learner_options) -> tuple[Path, CausalLMLearner]:
    """Two FOMAML steps of a tiny GPT-2 on a folder corpus; the checkpoint and the trained learner."""
    L.seed_everything(0, verbose=False)
    if "pretrained" not in learner_options:
        learner_options["model_config"] = model_config or dict(TINY)
    learner = CausalLMLearner(**learner_options)
    trainer = quiet_trainer(folder, callbacks=list(callbacks))
    trainer.fit(fomaml_module(learner), lm_tasks(folder))
    trainer.save_checkpoint(folder / "meta.ckpt")
    return folder / "meta.ckpt", learner.eval()


def fomaml_module(learner: CausalLMLearner) -> MetaLearningModule:
    return MetaLearningModule(learner, FOMAML(inner_lr=0.1), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))


def lm_tasks(folder: Path) -> LanguageModelingTasksDataModule:
    return LanguageModelingTasksDataModule(
        tokenizer="embedded-bpe-4096",
        corpus=str(write_corpus(folder / "corpus")),
        val_domains=["json"],
        test_domains=["html"],
        block_size=16,
        shots=1,
        queries=1,
        meta_batch_size=1,
        num_val_tasks=1,
        num_test_tasks=1,
    )


def tokens(count: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 4096, (count, length), generator=torch.Generator().manual_seed(1))


def logits_of(learner: CausalLMLearner, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return learner.predict({"input_ids": input_ids})


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    checkpoint, learner = meta_checkpoint(folder)
    return checkpoint, logits_of(learner, tokens())


@pytest.mark.xdist_group("test_export.plain")
def test_round_trip_gives_identical_logits_and_provenance(plain, tmp_path):
    checkpoint, expected = plain
    output = export(str(checkpoint), str(tmp_path / "export"))
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens()).logits, expected)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", PROVENANCE_FILE} <= {
        path.name for path in output.iterdir()
    }
    assert not any(name.startswith(("learner.", "model.")) for name in model.state_dict())
    umask = current_umask()  # model.safetensors was 0o600 (safetensors' own temporary file) beside 0o644 files
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in [output, *output.iterdir()]} == {
        path.name: oct((0o777 if path.is_dir() else 0o666) & ~umask) for path in [output, *output.iterdir()]
    }
    assert load_tokenizer(str(output)).get_vocab() == load_tokenizer("embedded-bpe-4096").get_vocab()
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["algorithm"]["class_path"].endswith("FOMAML")
    assert provenance["fast_weights"] == "all" and provenance["steps_trained"] == 2
    assert provenance["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert provenance["tokenizer_fingerprint"] == fingerprint_of("embedded-bpe-4096")
    # Tied input/output embeddings stay tied in the loaded model.
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_untied_embeddings_round_trip(tmp_path):
    checkpoint, learner = meta_checkpoint(tmp_path, model_config=dict(TINY, tie_word_embeddings=False))
    model = AutoModelForCausalLM.from_pretrained(export(str(checkpoint), str(tmp_path / "export")))
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens()).logits, logits_of(learner, tokens()))


def test_lora_is_merged_and_the_adapters_written_apart(tmp_path):
    checkpoint, learner = meta_checkpoint(tmp_path, lora=LoraSettings(r=2, alpha=4), meta_learn_base=True)
    expected = logits_of(learner, tokens())
    output = export(str(checkpoint), str(tmp_path / "export"), adapter_dir=str(tmp_path / "adapter"))
    model = AutoModelForCausalLM.from_pretrained(output)
    assert not any("lora_" in name for name in model.state_dict())
    with torch.no_grad():  # merging W + BA changes the order of float32 sums: equal to rounding
        torch.testing.assert_close(model(input_ids=tokens()).logits, expected, rtol=1e-5, atol=1e-5)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["lora"]["merged"] and provenance["fast_weights"] == "lora"


def test_a_pretrained_lora_base_is_left_out_of_checkpoints_rebuilt_and_checked(tmp_path):
    base = tmp_path / "base"
    L.seed_everything(1, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(base)
    checkpoint, learner = meta_checkpoint(tmp_path, pretrained=str(base), lora=LoraSettings(r=2, alpha=4))
    expected = logits_of(learner, tokens())
    saved = torch.load(checkpoint, weights_only=True)
    frozen = {name for name, weight in learner.named_parameters() if not weight.requires_grad}
    trained = {name for name, weight in learner.named_parameters() if weight.requires_grad}
    kept = {key.removeprefix("learner.") for key in saved["state_dict"]}
    assert frozen and not frozen & kept and trained <= kept  # only the adapters (and buffers) are saved
    record = saved["lightning_meta"][REBUILT_WEIGHTS]
    assert record["from"] == str(base) and frozen <= set(record["names"])
    # The frozen base comes back from `pretrained`: loading, resuming and exporting give the trained model.
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint).learner.eval()
    assert torch.equal(logits_of(loaded, tokens()), expected)
    resumed = fomaml_module(CausalLMLearner(pretrained=str(base), lora=LoraSettings(r=2, alpha=4)))
    trainer = quiet_trainer(tmp_path / "resumed", max_steps=3)
    trainer.fit(resumed, lm_tasks(tmp_path), ckpt_path=checkpoint)
    assert trainer.global_step == 3
    model = AutoModelForCausalLM.from_pretrained(export(str(checkpoint), str(tmp_path / "export")))
    with torch.no_grad():  # merged W + BA: equal to rounding
        torch.testing.assert_close(model(input_ids=tokens()).logits, expected, rtol=1e-5, atol=1e-5)
    # Another model at `pretrained` is refused by fingerprint, never silently combined with the adapters.
    L.seed_everything(2, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(base)
    message = (
        r"frozen weights are rebuilt from .*base, but what it holds now is not what the run was trained on "
        r"\(fingerprint .*its files changed since.*pretrained=FOLDER"
    )
    with pytest.raises(CheckpointError, match=message):
        MetaLearningModule.load_from_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=message):
        export(str(checkpoint), str(tmp_path / "export-2"))
    assert not (tmp_path / "export-2").exists()
    # A random base (model_config) cannot be rebuilt: its checkpoint keeps it.
    random_base, _ = meta_checkpoint(tmp_path / "random", lora=LoraSettings(r=2, alpha=4))
    saved = torch.load(random_base, weights_only=True)
    assert REBUILT_WEIGHTS not in saved["lightning_meta"] and len(saved["state_dict"]) > len(kept)


def test_a_slim_checkpoint_finds_its_base_from_another_folder_or_where_it_is_given(tmp_path, monkeypatch):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    L.seed_everything(1, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(run / "exports" / "b2")
    monkeypatch.chdir(run)  # the base named relative to the run's folder, as a user types it
    checkpoint, learner = meta_checkpoint(run, pretrained="exports/b2", lora=LoraSettings(r=2, alpha=4))
    expected = logits_of(learner, tokens())
    # Without the record of what it leaves out, a checkpoint lacking weights is refused in one line.
    cut = torch.load(checkpoint, weights_only=True)
    del cut["lightning_meta"][REBUILT_WEIGHTS]
    torch.save(cut, run / "cut.ckpt")
    message = r"lacks \d+ frozen weights of the learner's pretrained model \('exports/b2'.* holds no record of leaving"
    with pytest.raises(CheckpointError, match=message):
        MetaLearningModule.load_from_checkpoint(run / "cut.ckpt")
    with pytest.raises(CheckpointError, match=message):
        export(str(run / "cut.ckpt"), str(tmp_path / "cut-export"))

    monkeypatch.chdir(elsewhere)  # the relative path finds nothing here: the folder found at training is used
    loaded = MetaLearningModule.load_from_checkpoint(checkpoint).learner.eval()
    assert torch.equal(logits_of(loaded, tokens()), expected)
    assert (export(str(checkpoint), str(tmp_path / "from-record")) / "model.safetensors").is_file()
    shutil.move(run / "exports" / "b2", tmp_path / "moved")  # now nowhere it was: the message says where to give it
    with pytest.raises(
        FileNotFoundError,
        match=rf"'exports/b2' is neither a local path \(nothing at {elsewhere}/"
        r"exports/b2\).* give its folder on this machine with --pretrained FOLDER",
    ):
        export(str(checkpoint), str(tmp_path / "lost"))
    output = export(str(checkpoint), str(tmp_path / "given"), pretrained=str(tmp_path / "moved"))
    with torch.no_grad():  # merged W + BA: equal to rounding
        logits = AutoModelForCausalLM.from_pretrained(output)(input_ids=tokens()).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    L.seed_everything(2, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"the one loaded now \('.*other'\) is not the one it was trained on"):
        export(str(checkpoint), str(tmp_path / "wrong"), pretrained=str(tmp_path / "other"))


def text_tasks(folder: Path) -> TextToTextTasksDataModule:
    return TextToTextTasksDataModule(
        tokenizer="embedded-bpe-4096",
        dataset=str(write_tasks(folder)),
        shots=2,
        queries=1,
        max_length=32,
        meta_batch_size=1,
        val_tasks=["t0"],
        test_tasks=["t1"],
        num_val_tasks=1,
        num_test_tasks=1,
    )


@pytest.mark.parametrize("precision, algorithm", [("64-true", FOMAML), ("bf16-true", MetaICL)])
def test_a_slim_checkpoint_resumes_tests_and_exports_after_training_in_any_precision(tmp_path, precision, algorithm):
    """The trainer casts the model (64-true, bf16-true) after the learner is built; the base is rebuilt uncast."""
    base = tmp_path / "base"
    L.seed_everything(1, verbose=False)
    CausalLMLearner(model_config=dict(TINY)).model.save_pretrained(base)

    def module() -> MetaLearningModule:
        learner = CausalLMLearner(pretrained=str(base), lora=LoraSettings(r=2, alpha=4))
        return MetaLearningModule(learner, FOMAML(inner_lr=0.1) if algorithm is FOMAML else MetaICL())

    data = lm_tasks if algorithm is FOMAML else text_tasks
    trainer = quiet_trainer(tmp_path, precision=precision)
    trainer.fit(trained := module(), data(tmp_path))
    checkpoint = tmp_path / "meta.ckpt"
    trainer.save_checkpoint(checkpoint)
    assert REBUILT_WEIGHTS in torch.load(checkpoint, weights_only=True)["lightning_meta"]
    resumed = quiet_trainer(tmp_path / "resumed", precision=precision, max_steps=3)
    resumed.fit(module(), data(tmp_path), ckpt_path=checkpoint)
    assert resumed.global_step == 3
    quiet_trainer(tmp_path / "tested", precision=precision).test(module(), data(tmp_path), ckpt_path=checkpoint)
    # Loaded as built (float32): the trained adapters as saved, the base as the pretrained folder holds it.
    loaded = dict(MetaLearningModule.load_from_checkpoint(checkpoint).learner.named_parameters())
    pretrained = CausalLMLearner(pretrained=str(base)).state_dict()
    for name, weight in trained.learner.named_parameters():
        if not weight.requires_grad:  # peft's name of a base weight
            weight = pretrained[name.replace("base_model.model.", "").replace(".base_layer", "")]
        assert torch.equal(loaded[name], weight.to(torch.float32)), name
    assert (export(str(checkpoint), str(tmp_path / "export")) / "model.safetensors").is_file()


def test_export_callback_writes_the_same_folder_at_the_end_of_fit(tmp_path):
    checkpoint, learner = meta_checkpoint(tmp_path, callbacks=[ExportCallback(str(tmp_path / "in-run"))])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "in-run")
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens()).logits, logits_of(learner, tokens()))
    assert json.loads((tmp_path / "in-run" / PROVENANCE_FILE).read_text())["steps_trained"] == 2


@pytest.mark.xdist_group("test_export.plain")
def test_existing_folder_is_refused_and_kept_unless_overwrite(plain, tmp_path):
    checkpoint, _ = plain
    output = tmp_path / "export"
    export(str(checkpoint), str(output))
    (output / "stale.txt").write_text("from the earlier export")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(str(checkpoint), str(output))
    assert (output / "stale.txt").exists()
    export(str(checkpoint), str(output), overwrite=True)  # an earlier export: replaced
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left behind


@pytest.mark.xdist_group("test_export.plain")
def test_overwrite_never_replaces_a_run_folder_a_file_or_the_root(plain, tmp_path):
    checkpoint, _ = plain
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    source = shutil.copy(checkpoint, run / "checkpoints" / "last.ckpt")
    (run / "notes.txt").write_text("my notes")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file")
    cases = [
        (run, "holds the checkpoint being exported"),  # the run folder, an ancestor of the checkpoint
        (run / "checkpoints", "holds the checkpoint being exported"),
        (Path(source), "holds the checkpoint being exported"),  # the checkpoint itself
        (notes, r"is not an earlier export \(no meta_learning.json"),
        (tmp_path, "holds the checkpoint being exported"),
    ]
    for output, message in cases:
        with pytest.raises(FileExistsError, match=message):
            export(str(source), str(output), overwrite=True)
    other = tmp_path / "someone-elses"
    other.mkdir()
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export(str(source), str(other), overwrite=True)
    assert (run / "notes.txt").read_text() == "my notes" and Path(source).read_bytes() == checkpoint.read_bytes()
    assert notes.read_text() == "a file"
    root_before = sorted(os.listdir("/"))
    with pytest.raises(FileExistsError, match="holds the checkpoint being exported"):  # an ancestor of it
        export(str(source), "/", overwrite=True)
    assert sorted(os.listdir("/")) == root_before


@pytest.mark.xdist_group("test_export.plain")
def test_unwritable_output_is_refused_before_loading_the_model(plain, tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    from lightning_meta import cli
    from lightning_meta.handoff import export as export_module

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(export_module, "read_checkpoint", never)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--ckpt_path", str(plain[0]), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"Cannot write to {tmp_path} (Read-only file system)" in error and "writable file system" in error
    assert "Traceback" not in error


@pytest.mark.xdist_group("test_export.plain")
def test_bad_checkpoints_are_named(plain, tmp_path):
    checkpoint, _ = plain
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        export(str(truncated), str(tmp_path / "a"))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {"hidden": 3}}, other)
    with pytest.raises(CheckpointError, match="not from lightning-meta"):
        export(str(other), str(tmp_path / "b"))
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        export(str(tmp_path), str(tmp_path / "c"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_tokenizer_is_named_and_can_be_given(tmp_path):
    tokenizer_folder = tmp_path / "my-tokenizer"
    load_tokenizer("embedded-bpe-4096").save_pretrained(tokenizer_folder)
    checkpoint, learner = meta_checkpoint(tmp_path, tokenizer=str(tokenizer_folder))
    moved = tmp_path / "moved-tokenizer"
    shutil.move(tokenizer_folder, moved)
    with pytest.raises(FileNotFoundError, match="--tokenizer FOLDER"):
        export(str(checkpoint), str(tmp_path / "export"))
    with pytest.raises(ValueError, match="fingerprint"):
        export(str(checkpoint), str(tmp_path / "export"), tokenizer="embedded-wordpiece-4096")
    output = export(str(checkpoint), str(tmp_path / "export"), tokenizer=str(moved))
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(output)(input_ids=tokens()).logits
    assert torch.equal(logits, logits_of(learner, tokens()))


@pytest.mark.xdist_group("test_export.plain")
def test_export_command(plain, tmp_path):
    checkpoint, expected = plain
    command = ["lightning-meta", "export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    assert subprocess.run(command, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=tokens()).logits, expected)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "lightning-meta: error: FileExistsError:" in again.stderr
    assert "Traceback" not in again.stderr
    help_text = subprocess.run(["lightning-meta", "--help"], env=env, capture_output=True, text=True).stdout
    assert "lightning-meta export" in help_text and "lightning-meta pretrain" in help_text


def test_encoder_learner_exports_its_encoder_for_automodel(tmp_path):
    from transformers import AutoModel

    from lightning_meta import EncoderLearner
    from lightning_meta.datamodules import TextClassificationDataModule

    L.seed_everything(0, verbose=False)
    config = {
        "vocab_size": 4096,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    learner = EncoderLearner(encoder_config=config, ways=3, fast_weights="head")
    module = MetaLearningModule(learner, FOMAML(inner_lr=0.5), optimizer=functools.partial(torch.optim.AdamW, lr=0.01))
    data = TextClassificationDataModule(
        ways=3, shots=1, queries=2, meta_batch_size=1, max_length=16, num_eval_episodes=2
    )
    trainer = quiet_trainer(tmp_path)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "encoder.ckpt")
    export(tmp_path / "encoder.ckpt", tmp_path / "out")  # the tokenizer: the datamodule's, from its state
    exported = AutoModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 4096, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = learner.eval().model.encoder(input_ids=ids).last_hidden_state
        torch.testing.assert_close(exported(input_ids=ids).last_hidden_state, expected)
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["head_not_exported"] == {"ways": 3}
    assert provenance["tokenizer"] == "embedded-wordpiece-4096"
    assert provenance["tokenizer_fingerprint"] == fingerprint_of("embedded-wordpiece-4096")


def test_weights_that_do_not_fit_are_refused_alike_for_every_kind_of_checkpoint():
    from transformers import AutoConfig

    from lightning_meta.handoff.export import model_from_checkpoint

    config = AutoConfig.for_model(**TINY).to_dict()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    state = {f"model.{key}": value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    state["model.extra.weight"] = torch.zeros(1)
    saved = {"module": "pretraining", "hf_config": config, "tokenizer": "embedded-bpe-4096"}
    with pytest.raises(CheckpointError, match=r"weights do not fit its model: missing .*unexpected \['extra.weight'\]"):
        model_from_checkpoint({"lightning_meta": saved, "state_dict": state})
    with pytest.raises(CheckpointError, match=r"no model weights \(no 'model\.' keys\)"):
        model_from_checkpoint({"lightning_meta": saved, "state_dict": {}})


@pytest.mark.xdist_group("test_export.plain")
def test_a_full_disk_while_exporting_says_so_and_keeps_the_earlier_export(plain, tmp_path, monkeypatch, capsys):
    import errno

    from transformers import PreTrainedModel

    from lightning_meta import cli

    checkpoint, _ = plain
    output = tmp_path / "export"
    export(str(checkpoint), str(output))
    earlier = (output / "model.safetensors").read_bytes()

    def disk_fills_up(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(earlier[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_fills_up)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(output), "--overwrite=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"The disk is full: the export {output} was not saved" in error and "another disk" in error
    assert "Traceback" not in error
    assert (output / "model.safetensors").read_bytes() == earlier and [p.name for p in tmp_path.iterdir()] == ["export"]
