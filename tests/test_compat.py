"""Each private framework detail in lightning_meta._compat, checked against the installed framework.

A test here fails when Lightning, jsonargparse, torch or transformers renames or changes what a wrapper relies on;
the last tests keep private framework access out of the rest of the package.
"""

from __future__ import annotations

import argparse
import inspect
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_meta import _compat

ROOT = Path(__file__).resolve().parents[1]


def test_cli_hyperparameters_are_the_config_lightning_cli_hands_over():
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    assert _compat.cli_hyperparameters() is None
    with _given_hyperparameters_context(hparams={"eval_inner_steps": 3}, instantiator="some.instantiator"):
        given = _compat.cli_hyperparameters()
        assert given == {"eval_inner_steps": 3, "_instantiator": "some.instantiator"}

        class Module(L.LightningModule):
            def __init__(self, eval_inner_steps: int = 1) -> None:
                super().__init__()
                self.save_hyperparameters()

        assert dict(Module(eval_inner_steps=5).hparams) == given  # what save_hyperparameters() then saves
    assert _compat.cli_hyperparameters() is None


def test_attached_trainer_is_none_until_a_trainer_is_attached():
    module = BoringModel()
    assert _compat.attached_trainer(module) is None
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert _compat.attached_trainer(module) is trainer


def test_batches_consumed_counts_the_batches_the_fit_loop_used_over_epochs(tmp_path):
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(_compat.batches_consumed(trainer))

    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert seen == [1, 2, 3, 4, 5, 6]  # the running batch included, not the one Lightning prefetched
    assert _compat.batches_consumed(trainer) == 6


def test_set_data_parallel_degree_sets_what_model_parallel_strategy_builds_its_mesh_from():
    strategy = ModelParallelStrategy(data_parallel_size=3, tensor_parallel_size=1)
    assert strategy._data_parallel_size == 3
    _compat.set_data_parallel_degree(strategy, 4)
    assert strategy._data_parallel_size == 4
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert 'if self._data_parallel_size == "auto"' in source and "_setup_device_mesh(" in source


def test_reparametrized_runs_with_the_given_weights_differentiably_and_restores_the_module():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    original = layer.weight.detach().clone()
    weight = torch.randn(2, 3, requires_grad=True)
    inputs = torch.randn(4, 3)
    with _compat.reparametrized(layer, {"weight": weight}):
        output = layer(inputs)
    assert torch.equal(output, inputs @ weight.T + layer.bias)
    (gradient,) = torch.autograd.grad(output.sum(), weight)
    assert torch.allclose(gradient, inputs.sum(0).expand(2, 3))
    assert isinstance(layer.weight, nn.Parameter) and torch.equal(layer.weight, original)


def test_foreach_add_equals_the_loop_with_second_order_gradients():
    torch.manual_seed(0)
    weights = [torch.randn(3, requires_grad=True, dtype=torch.float64) for _ in range(2)]
    gradients = [(w**2).sum() * w for w in weights]  # depend on the weights: a second-order path
    fused = _compat.foreach_add(weights, gradients, alpha=-0.1)
    looped = [w - 0.1 * g for w, g in zip(weights, gradients, strict=True)]
    assert all(torch.allclose(a, b, rtol=0, atol=1e-15) for a, b in zip(fused, looped, strict=True))
    first = torch.autograd.grad(sum(t.sum() for t in fused), weights, retain_graph=True)
    second = torch.autograd.grad(sum(t.sum() for t in looped), weights)
    assert all(torch.allclose(a, b) for a, b in zip(first, second, strict=True))


def test_parse_object_unvalidated_accepts_a_partial_config():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--name", type=str, default="x")
    with pytest.raises(Exception, match="steps"):
        parser.parse_object({"name": "y"})
    assert _compat.parse_object_unvalidated(parser, {"name": "y"}).name == "y"


def test_lightning_cli_still_merges_checkpoints_in_the_method_the_compat_class_switches_off():
    from lightning.pytorch.cli import LightningCLI

    calls = []

    class Recording(LightningCLI):
        def _parse_ckpt_path(self) -> None:
            calls.append(self.config)

    Recording(BoringModel, run=False, args=[], save_config_callback=None)
    assert len(calls) == 1  # LightningCLI calls it after parsing: overriding it is what switches the merge off
    assert "_parse_ckpt_path" in vars(_compat.CLIWithoutCheckpointMerge)
    assert _compat.CLIWithoutCheckpointMerge._parse_ckpt_path(object()) is None


def _jsonargparse_error(parser: ArgumentParser, args: list[str]) -> str:
    with pytest.raises(argparse.ArgumentError) as caught:
        parser.parse_args(args)
    return caught.value.message


def test_unresolved_class_wording_is_jsonargparse_s():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--module", type=nn.Module)
    for value in ("NoSuchModule", "torch.optim.Adam"):  # not a dot path; not a subclass
        message = _jsonargparse_error(parser, [f"--module={value}"])
        assert _compat.is_unresolved_class_error(message), message
    assert not _compat.is_unresolved_class_error("Problem with given class_path 'x': Expected a dot import path string")
    assert _compat.unresolved_class_name(_jsonargparse_error(parser, ["--module=NoSuchModule"])) == "NoSuchModule"
    in_a_mapping = _jsonargparse_error(parser, ["--module={class_path: NoSuchModule}"])
    assert _compat.unresolved_class_name(in_a_mapping) == "NoSuchModule", in_a_mapping
    assert _compat.unresolved_class_name('Parser key "module": invalid choice') is None


def test_text_given_a_mapping_wording_is_jsonargparse_s():
    class Templated:
        def __init__(self, template: str = "{input}") -> None:
            self.template = template

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Templated, "data")
    message = _jsonargparse_error(parser, ["--data={template: {a: b}}"])
    assert _compat.text_option_given_mapping(message) == ("data.template", "{'a': 'b'}"), message
    assert _compat.text_option_given_mapping("Parser key \"template\": Expected a <class 'int'>") is None


def test_unknown_subcommand_wording_is_argparse_s():
    parser = ArgumentParser(exit_on_error=False)
    subcommands = parser.add_subcommands()
    subcommands.add_subcommand("fit", ArgumentParser())
    assert _compat.unknown_subcommand(_jsonargparse_error(parser, ["fitt"])) == "fitt"
    assert _compat.unknown_subcommand(_jsonargparse_error(parser, [])) == ""
    assert _compat.unknown_subcommand('Parser key "model": invalid choice') is None


@pytest.mark.parametrize("logger_class", ["TensorBoardLogger", "CSVLogger"])
def test_loggers_claim_their_version_folder_so_racing_runs_get_one_each(tmp_path, monkeypatch, logger_class):
    """Lightning lists the folder to choose a version; a run that listed it just before another created
    version_0 would take version_0 too. Each claim creates its folder, so racing claims get one each."""
    import threading

    from lightning.pytorch import loggers

    cls = getattr(loggers, logger_class)
    first = cls(tmp_path)
    _compat.claim_version_when_chosen(first)
    assert first.version == 0 and (tmp_path / "lightning_logs" / "version_0").is_dir()
    monkeypatch.setattr(cls, "_get_next_version", lambda self: 0)  # every listing as stale as a racing run's
    racers = [cls(tmp_path) for _ in range(6)]
    for logger in racers:
        _compat.claim_version_when_chosen(logger)
    start = threading.Barrier(len(racers))

    def claim(logger):
        start.wait()
        assert logger.log_dir  # the first question for the version chooses it

    threads = [threading.Thread(target=claim, args=(logger,)) for logger in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(logger.version for logger in racers) == [1, 2, 3, 4, 5, 6]
    assert Path(racers[0].log_dir) == tmp_path / "lightning_logs" / f"version_{racers[0].version}"
    given = cls(tmp_path, version=0)
    _compat.claim_version_when_chosen(given)  # a version the user gives is kept
    assert given.version == 0


def test_lightning_pytree_deprecation_is_hidden_by_its_private_module_name():
    import importlib
    import warnings

    pytree = importlib.import_module("lightning.pytorch.utilities._pytree")
    assert "LeafSpec" in inspect.getsource(pytree)  # where torch's deprecation is raised from
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _compat.hide_lightning_pytree_deprecation()
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, pytree.__file__, 1, module=pytree.__name__
        )
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "mine.py", 1, module="mine"
        )
    assert [w.filename for w in seen] == ["mine.py"]


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def test_attention_implementation_reads_what_set_attn_implementation_set():
    model = tiny_llama()
    assert _compat.attention_implementation(model) == "sdpa"  # transformers' default on torch 2.13
    model.set_attn_implementation("eager")
    assert _compat.attention_implementation(model) == "eager"


def test_activation_checkpointing_is_enabled_by_transformers_current_name_without_its_warning():
    model = tiny_llama().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gradient_checkpointing_enable warns that it goes in transformers v6
        _compat.enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing


def test_block_checkpoint_function_is_what_each_checkpointed_block_recomputes_through():
    model = tiny_llama().train()
    _compat.enable_activation_checkpointing(model)
    calls = []

    def recording(function, *args):
        calls.append(function.args[0])  # transformers hands partial(forward, block, **kwargs)
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    blocks = _compat.set_block_checkpoint_function(model, recording)
    assert set(model.model.layers) <= set(blocks)  # (the model holding them has the attribute too)
    ids = torch.randint(0, 32, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == list(model.model.layers)  # each block, once, in the forward
    assert all(p.grad is not None for p in model.model.layers.parameters())


#: Private framework access, as the project's checks grep for it.
PRIVATE = re.compile(
    r"_given_hyperparameters|_hparams_initial|_parse_ckpt_path|_skip_validation|_data_parallel_size|self\._trainer\b"
    r"|fit_loop\.|torch\._foreach|from lightning(\.[a-z_.]+)? import _|from torch(\.[a-z_.]+)? import _"
    r"|nn\.modules\.[a-z_]+\._|utilities\\?\._pytree|\._attn_implementation\b|_gradient_checkpointing_func"
)


def private_framework_access() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for folder in ("lightning_meta", "algorithms", "datamodules"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            if name == "lightning_meta/_compat.py":
                continue
            lines = [
                f"{number}: {line.strip()}"
                for number, line in enumerate(path.read_text().splitlines(), 1)
                if PRIVATE.search(line)
            ]
            if lines:
                found[name] = lines
    return found


def test_no_private_framework_access_outside_compat():
    assert private_framework_access() == {}


def test_under_function_transform_sees_vmaps_tensors_and_not_plain_ones():
    seen = []
    torch.func.vmap(lambda row: seen.append(_compat.under_function_transform(row)) or row)(torch.ones(2, 3))
    assert seen == [True] and not _compat.under_function_transform(torch.ones(3))


def test_the_native_bf16_query_is_torchs_own_op_and_answers_a_bool():
    # Fails when torch renames or drops the private op: cpu_has_native_bf16 would then always say True.
    assert hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    assert _compat.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
