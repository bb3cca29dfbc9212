"""The ways meta_loss runs a meta-batch (vmap, task by task, all at once) give one meta-gradient; auto picks safely."""

from __future__ import annotations

import copy
import runpy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import lightning_meta.training.meta_batch as execution
from lightning_meta import MLP, CausalLMLearner, ClassificationLearner, MetaLearningModule, RegressionLearner, TaskBatch
from lightning_meta.algorithms import (
    ANIL,
    FOMAML,
    MAML,
    MAMLPlusPlus,
    MetaAlgorithm,
    MetaSGD,
    MultiTask,
    ProtoNet,
    Reptile,
)
from lightning_meta.datamodules import SinusoidDataModule

from conftest import Blocks, classification_batch, regression_batch

ALGORITHMS = {
    "maml": lambda: MAML(inner_lr=0.3, inner_steps=2),
    "maml_first_order": lambda: MAML(inner_lr=0.3, inner_steps=2, first_order=True),
    "fomaml": lambda: FOMAML(inner_lr=0.3, inner_steps=2),
    "reptile": lambda: Reptile(inner_lr=0.3, inner_steps=3),
    "meta_sgd": lambda: MetaSGD(inner_lr=0.3, inner_steps=2),
    "maml_plus_plus": lambda: MAMLPlusPlus(inner_lr=0.3, inner_steps=2, msl_anneal_steps=4),
    "anil": lambda: ANIL(inner_lr=0.3, inner_steps=2),
    "multi_task": lambda: MultiTask(inner_lr=0.3),
}


def _meta_gradient(learner: nn.Module, algorithm: MetaAlgorithm, batch: TaskBatch, meta_batch: str):
    for module in (learner, algorithm):
        module.zero_grad(set_to_none=True)
    out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
    out.loss.backward()
    gradients = {name: p.grad for module in (learner, algorithm) for name, p in module.named_parameters()}
    return out, gradients


def _assert_same_meta_gradient(learner, algorithm, batch, fast="vmap", reference="task_by_task"):
    expected_out, expected = _meta_gradient(learner, algorithm, batch, reference)
    found_out, found = _meta_gradient(learner, algorithm, batch, fast)
    torch.testing.assert_close(found_out.loss, expected_out.loss.detach(), rtol=1e-12, atol=1e-14)
    assert found_out.metrics.keys() == expected_out.metrics.keys()
    for name, value in expected_out.metrics.items():
        torch.testing.assert_close(found_out.metrics[name], value, rtol=1e-12, atol=1e-14, msg=name)
    for name, gradient in expected.items():
        torch.testing.assert_close(found[name], gradient, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("case", ALGORITHMS)
def test_vmap_gives_the_loop_meta_gradient_on_an_mlp(case):
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8, 8], 1)).double()
    algorithm = ALGORITHMS[case]()
    algorithm.bind(learner)
    algorithm.outer_step = 1  # MAML++: a step inside the multi-step-loss annealing
    batch = regression_batch(meta_batch_size=4)
    _assert_same_meta_gradient(learner, algorithm, batch)
    _assert_same_meta_gradient(learner, algorithm, batch, fast="auto")


def test_protonet_and_a_classifier_paths_agree():
    torch.manual_seed(0)
    learner = ClassificationLearner(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))).double()
    batch = classification_batch(meta_batch_size=3)
    _assert_same_meta_gradient(learner, ProtoNet(), batch, fast="auto")  # falls back to the loop
    _assert_same_meta_gradient(learner, MAML(inner_lr=0.3, inner_steps=2), batch)


def _layer_norm_learner() -> RegressionLearner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))
    return RegressionLearner(model).double()


def test_layer_norm_first_order_runs_under_vmap_and_second_order_is_refused():
    learner = _layer_norm_learner()
    batch = regression_batch(meta_batch_size=3)
    _assert_same_meta_gradient(learner, FOMAML(inner_lr=0.3, inner_steps=2), batch)
    with pytest.raises(ValueError, match="normalization.*meta_batch='task_by_task'"):
        MAML(inner_lr=0.3, inner_steps=2).meta_loss(learner, batch, meta_batch="vmap")


def test_auto_checks_vmap_against_the_loop_and_falls_back_where_they_differ(monkeypatch):
    # vmap's known-wrong case (second order through LayerNorm), with the refusal rule switched off:
    # the self-check on the first batch must catch it.
    logged = []
    monkeypatch.setattr(execution, "rank_zero_debug", logged.append)
    monkeypatch.setattr(execution.MetaBatchRunner, "refusal", lambda self, algorithm, learner: None)
    learner = _layer_norm_learner()
    algorithm = MAML(inner_lr=0.5, inner_steps=2)
    batch = regression_batch(meta_batch_size=3)
    _assert_same_meta_gradient(learner, algorithm, batch, fast="auto")
    _assert_same_meta_gradient(learner, algorithm, batch, fast="auto")
    assert len(logged) == 1 and "differs from the task-by-task loop's" in logged[0], logged


def test_auto_uses_vmap_for_small_models_and_logs_why_it_does_not(monkeypatch):
    logged, vmapped = [], []
    monkeypatch.setattr(execution, "rank_zero_debug", logged.append)
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *args, **kwargs: vmapped.append(1) or vmap(*args, **kwargs))
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [8], 1)).double()
    algorithm = MAML(inner_lr=0.3, inner_steps=2)
    for _ in range(3):
        algorithm.meta_loss(learner, regression_batch())
    assert len(vmapped) == 3 and logged == []
    monkeypatch.setattr(execution, "VMAP_MAX_PARAMETERS", 10)
    other = MAML(inner_lr=0.3, inner_steps=2)
    for _ in range(2):
        other.meta_loss(learner, regression_batch())
    assert len(vmapped) == 3
    assert len(logged) == 1 and "trainable parameters, more than VMAP_MAX_PARAMETERS=10" in logged[0], logged


def test_auto_decides_in_float32_under_bf16_autocast_and_runs_the_step_in_bf16(monkeypatch):
    # bf16 rounding alone makes vmap and the loop differ by 3e-2 relative (a float32 tolerance refused vmap
    # always): the verdict is taken with autocast off, then the step runs on vmap at the caller's precision.
    logged = []
    monkeypatch.setattr(execution, "rank_zero_debug", logged.append)
    torch.manual_seed(0)
    learner = RegressionLearner(MLP(1, [40, 40], 1))
    batch = SinusoidDataModule(meta_batch_size=5).eval_batches("val")[0]
    algorithm = MAML(inner_lr=0.05, inner_steps=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found_out, found = _meta_gradient(learner, algorithm, batch, "auto")
        expected_out, expected = _meta_gradient(learner, algorithm, batch, "vmap")
        _, looped = _meta_gradient(learner, algorithm, batch, "task_by_task")
    assert list(algorithm._runners["auto"].verdicts.values()) == [""] and logged == []
    for name, gradient in expected.items():  # the bf16 step itself, not the float32 check's
        torch.testing.assert_close(found[name], gradient, rtol=0, atol=0, msg=name)
    difference = torch.cat([(found[name] - looped[name]).flatten() for name in looped])
    assert difference.norm() / torch.cat([g.flatten() for g in looped.values()]).norm() < 0.1  # bf16 rounding

    def figures_of(episode, parallel):
        *_, adapted = algorithm.adapt_steps(learner, episode.support, parallel=parallel)
        return learner.evaluation_metrics(episode.query, adapted, parallel=parallel)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation's own verdict, the same way
        figures = algorithm._runners["auto"].evaluate(algorithm, learner, batch, figures_of)
    assert list(algorithm._runners["auto"].verdicts.values()) == ["", ""] and figures["loss"].shape == (5,)


@pytest.mark.parametrize(
    "make, algorithm, match",
    [
        (lambda: ClassificationLearner(nn.Linear(4, 3)).double(), ProtoNet(), "counts each episode.s classes"),
        (
            lambda: RegressionLearner(nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.1), nn.Linear(4, 1))),
            FOMAML(),
            "Dropout, p=0.1",
        ),
        (
            lambda: RegressionLearner(nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))),
            FOMAML(),
            "running statistics",
        ),
    ],
)
def test_forcing_vmap_where_it_is_not_exact_raises_naming_why(make, algorithm, match):
    learner = make()
    batch = classification_batch() if isinstance(algorithm, ProtoNet) else regression_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{match}.*Use meta_batch='task_by_task'"):
        algorithm.meta_loss(learner, batch, meta_batch="vmap")


def test_an_unknown_meta_batch_is_refused(mlp_learner):
    with pytest.raises(ValueError, match="meta_batch must be one of"):
        MAML().meta_loss(mlp_learner, regression_batch(), meta_batch="parallel")


def test_reptile_skips_the_query_when_not_reporting_it(mlp_learner):
    algorithm = Reptile(inner_lr=0.3, inner_steps=2)
    batch = regression_batch()
    reported = algorithm.meta_loss(mlp_learner, batch, meta_batch="task_by_task", report_query=True)
    assert set(reported.metrics) == {"query_loss"}  # asked for as an argument
    algorithm.report_query = True
    _, expected = _meta_gradient(mlp_learner, algorithm, batch, "task_by_task")
    algorithm.report_query = False
    for meta_batch in ("task_by_task", "vmap"):
        out, found = _meta_gradient(mlp_learner, algorithm, batch, meta_batch)
        assert out.metrics == {}
        for name, gradient in expected.items():
            torch.testing.assert_close(found[name], gradient, rtol=1e-12, atol=1e-14)


def _tiny_gpt2(attn_implementation: str) -> CausalLMLearner:
    config = {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "n_positions": 16,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    torch.manual_seed(0)
    return CausalLMLearner(
        model_config=config, tokenizer="embedded-bpe-4096", attn_implementation=attn_implementation, dtype="float64"
    )


def _token_batch() -> TaskBatch:
    ids = torch.randint(0, 4000, (2, 6, 12), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return TaskBatch(support={k: v[:, :3] for k, v in split.items()}, query={k: v[:, 3:] for k, v in split.items()})


def test_a_tiny_gpt2_first_order_under_vmap_and_its_refusals():
    learner = _tiny_gpt2("eager")
    _assert_same_meta_gradient(learner, FOMAML(inner_lr=0.3, inner_steps=2), _token_batch())
    with pytest.raises(ValueError, match="normalization"):
        MAML(inner_lr=0.3).meta_loss(learner, _token_batch(), meta_batch="vmap")
    with pytest.raises(ValueError, match="'sdpa' attention.*attn_implementation='eager'"):
        FOMAML().meta_loss(_tiny_gpt2("sdpa"), _token_batch(), meta_batch="vmap")


def test_the_host_passes_meta_batch_and_reports_reptile_query_only_on_logging_steps(monkeypatch):
    algorithm = Reptile(inner_lr=0.03, inner_steps=2)
    calls = []
    meta_loss = algorithm.meta_loss

    def spy(learner, batch, **step):
        out = meta_loss(learner, batch, **step)
        runner = step["meta_batch"]  # the host's own runner, which keeps its verdicts
        calls.append(
            (runner is module.runner and runner.mode, step["outer_step"], step["report_query"], sorted(out.metrics))
        )
        return out

    monkeypatch.setattr(algorithm, "meta_loss", spy)
    module = MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), algorithm, meta_batch="vmap")
    options = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = L.Trainer(max_steps=4, log_every_n_steps=2, limit_val_batches=0, **options)
    trainer.fit(module, SinusoidDataModule(meta_batch_size=4, batches_per_epoch=5))
    assert calls == [
        ("vmap", 0, False, []),
        ("vmap", 1, True, ["query_loss"]),
        ("vmap", 2, False, []),
        ("vmap", 3, True, ["query_loss"]),
    ]


def test_the_speed_benchmark_runs_and_its_gradient_check_passes(monkeypatch, capsys):
    script = Path(__file__).parents[2] / "benchmarks" / "speed" / "run.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--workloads", "W1", "--algorithms", "maml", "reptile"])
    runpy.run_path(str(script), run_name="__main__")  # exits with an error if a gradient check fails
    printed = capsys.readouterr().out
    assert printed.count("gradient vs plain loop") == 2 and "| W1 | reptile |" in printed


def test_the_host_refuses_an_unknown_meta_batch_at_construction():
    with pytest.raises(ValueError, match="meta_batch must be one of"):
        MetaLearningModule(RegressionLearner(MLP(1, [8], 1)), MAML(), meta_batch="parallel")


def test_unreached_parameters_get_no_gradient_so_weight_decay_acts_alike_in_every_mode():
    """Reptile on the head never reaches the backbone: no gradient in any mode, so AdamW's decay leaves it alone."""
    batches = [classification_batch(meta_batch_size=3, queries=2, seed=seed) for seed in range(3)]
    weights = {}
    for meta_batch in ("all_at_once", "task_by_task", "vmap", "auto"):
        torch.manual_seed(0)
        learner = ClassificationLearner(Blocks(), "head").double()
        algorithm = Reptile(inner_lr=0.3, inner_steps=2)
        optimizer = torch.optim.AdamW(learner.parameters(), lr=0.01, weight_decay=0.5)
        initial = {name: p.detach().clone() for name, p in learner.named_parameters()}
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
            out.loss.backward()
            assert learner.model.embed.weight.grad is None, meta_batch
            optimizer.step()
        weights[meta_batch] = {name: p.detach().clone() for name, p in learner.named_parameters()}
        assert torch.equal(weights[meta_batch]["model.embed.weight"], initial["model.embed.weight"])
        assert not torch.equal(weights[meta_batch]["model.head.weight"], initial["model.head.weight"])
    for meta_batch in ("task_by_task", "vmap", "auto"):
        for name, value in weights["all_at_once"].items():
            torch.testing.assert_close(weights[meta_batch][name], value, rtol=1e-12, atol=1e-14, msg=name)


def test_auto_decides_again_when_the_training_mode_changes():
    """A verdict formed in eval mode (dropout off: vmap) is not reused in training mode (dropout: task by task)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))
    learner = ClassificationLearner(model).double()
    algorithm = FOMAML(inner_lr=0.3)
    batch = classification_batch(meta_batch_size=2, ways=3, shots=2, queries=2, features=4)
    learner.eval()
    algorithm.meta_loss(learner, batch, meta_batch="auto").loss.backward()
    learner.train()
    torch.manual_seed(1)
    found = algorithm.meta_loss(learner, batch, meta_batch="auto").loss  # vmap here: "called random operation"
    torch.manual_seed(1)
    expected = algorithm.meta_loss(learner, batch, meta_batch="task_by_task").loss
    torch.testing.assert_close(found, expected)


def test_the_speed_benchmarks_reproduction_of_todays_code_gives_the_same_figures():
    """W3 times today's code by padding back to max_length and scoring each option by a full forward:
    the same scores and losses as the library's, so only the cost differs."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "learners"))
    from test_option_scoring import MODELS, TOKENIZER, choices

    bench = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "speed" / "run.py"), run_name="bench")
    torch.manual_seed(0)
    learner = CausalLMLearner(model_config=MODELS["llama"], tokenizer=TOKENIZER, dtype="float64")
    ids, mask, labels = choices()
    expected = learner.option_scores(ids, mask, labels)
    found = bench["full_forward_option_scores"](learner, ids, mask, labels)
    for value, reference in zip(found, expected, strict=True):
        torch.testing.assert_close(value, reference)
    split = {"input_ids": ids[:, 0], "attention_mask": mask[:, 0], "labels": labels[:, 0]}
    padded = bench["padded_to"](split, 40)
    assert padded["input_ids"].shape == (3, 40) and bool((padded["labels"][:, 16:] == -100).all())
    torch.testing.assert_close(learner.loss(padded)[0], learner.loss(split)[0])
    plain = copy.deepcopy(learner)  # the roofline's "before": logits at every position, read afterwards
    plain.read_logits = bench["full_logits"](plain)
    torch.testing.assert_close(plain.loss(split)[0], learner.loss(split)[0])
    for value, reference in zip(plain.option_scores(ids, mask, labels), expected, strict=True):
        torch.testing.assert_close(value, reference)
    assert bench["matmul_peak"](torch.float32, repeats=1) > 0
