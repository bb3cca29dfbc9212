"""Evaluation episodes adapted in parallel (one vmapped trajectory per batch) give the loop's figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_meta.training.meta_batch as execution
from lightning_meta import MLP, ClassificationLearner, MetaLearningModule, RegressionLearner
from lightning_meta.algorithms import FOMAML, MAML, MetaSGD, MultiTask

from conftest import classification_batch, regression_batch


def _figures(module: MetaLearningModule, batch) -> dict[str, tuple[float, float, int]]:
    module.validation_step(batch, 0)
    figures = {}
    for key, statistic in module.episode_stats.items():
        if statistic.update_count:
            summary = statistic.compute()
            figures[key] = (summary.mean, summary.ci95, summary.episodes)
            statistic.reset()
    return figures


def _sinusoid():
    torch.manual_seed(0)
    return RegressionLearner(MLP(1, [16, 16], 1)).double(), regression_batch(meta_batch_size=5)


def _head_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    model.add_module("head", nn.Linear(8, 3))
    return ClassificationLearner(model, fast_weights="head").double(), classification_batch(meta_batch_size=4)


@pytest.mark.parametrize("make", [_sinusoid, _head_classifier], ids=["sinusoid_mlp", "head_fast_weights"])
@pytest.mark.parametrize(
    "make_algorithm",
    [
        lambda: MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=4),
        lambda: FOMAML(inner_lr=0.2, eval_inner_lr=0.1),
        lambda: MetaSGD(inner_lr=0.2),
        lambda: MultiTask(inner_lr=0.2, eval_inner_steps=3),
    ],
    ids=["maml", "fomaml_eval_lr", "meta_sgd", "multitask"],
)
@pytest.mark.parametrize("eval_curve", [None, [0, 1, 3, 6]])
def test_parallel_evaluation_gives_the_loop_s_figures(make, make_algorithm, eval_curve, monkeypatch):
    learner, batch = make()
    learner.eval()
    vmapped = []
    vmap = torch.func.vmap
    monkeypatch.setattr(torch.func, "vmap", lambda *args, **kwargs: vmapped.append(1) or vmap(*args, **kwargs))
    figures = {}
    for meta_batch in ("task_by_task", "vmap", "auto"):
        module = MetaLearningModule(learner, make_algorithm(), meta_batch=meta_batch, eval_curve=eval_curve)
        count = len(vmapped)
        figures[meta_batch] = _figures(module, batch)
        assert (len(vmapped) > count) == (meta_batch != "task_by_task"), meta_batch
    expected = figures["task_by_task"]
    assert expected and all(key.startswith("val_") for key in expected)
    if eval_curve:
        assert any("_step6" in key for key in expected)
    for meta_batch in ("vmap", "auto"):
        assert figures[meta_batch].keys() == expected.keys()
        for key, (mean, ci95, count) in expected.items():
            found_mean, found_ci95, found_count = figures[meta_batch][key]
            assert found_count == count == len(batch)
            torch.testing.assert_close(found_mean, mean, rtol=1e-10, atol=1e-12, msg=f"{meta_batch} {key}")
            torch.testing.assert_close(found_ci95, ci95, rtol=1e-8, atol=1e-12, msg=f"{meta_batch} {key}")


def test_auto_evaluates_episode_by_episode_where_vmap_cannot_run_and_says_why(monkeypatch):
    logged = []
    monkeypatch.setattr(execution, "rank_zero_debug", logged.append)
    learner, batch = _sinusoid()
    algorithm = MAML(inner_lr=0.3, inner_steps=2)
    monkeypatch.setattr(execution, "VMAP_MAX_PARAMETERS", 10)
    module = MetaLearningModule(learner, algorithm, meta_batch="auto")
    first, second = _figures(module, batch), _figures(module, batch)
    assert first.keys() == second.keys() and len(logged) == 1, logged
    assert (
        "runs the tasks of a meta-batch one by one (task_by_task), and the episodes of an evaluation batch"
        in (logged[0])
    )
    assert "more than VMAP_MAX_PARAMETERS=10" in logged[0]
    algorithm.meta_loss(learner, regression_batch(), meta_batch=module.runner)  # training: said once already
    assert len(logged) == 1, logged


def test_forcing_parallel_evaluation_where_vmap_is_not_exact_names_why():
    torch.manual_seed(0)
    learner = RegressionLearner(nn.Sequential(nn.Linear(1, 4), nn.Dropout(0.1), nn.Linear(4, 1))).double()
    module = MetaLearningModule(learner, FOMAML(), meta_batch="vmap")
    with pytest.raises(ValueError, match="Dropout, p=0.1.*meta_batch='task_by_task'"):
        module.validation_step(regression_batch(), 0)


def test_text_to_text_episodes_with_options_evaluate_under_vmap_as_in_the_loop(tmp_path):
    """Scoring options under vmap needs no host sync or data-dependent shape (``aten::nonzero`` stopped it)."""
    import json

    from lightning_meta import CausalLMLearner
    from lightning_meta.datamodules import TextToTextTasksDataModule

    rows = [
        {
            "task": f"t{task}",
            "input": f"{' '.join(['word'] * (1 + example % 5))} {task} {example}",
            "output": "yes" if example % 2 else "no",
            "options": ["no", "yes", "maybe"][: 2 + task % 2],
        }
        for task in range(4)
        for example in range(8)
    ]
    (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    datamodule = TextToTextTasksDataModule(
        tokenizer="embedded-bpe-512",
        dataset=str(tmp_path / "tasks.jsonl"),
        shots=2,
        queries=2,
        max_length=48,
        val_tasks=["t0", "t1"],
        test_tasks=["t2"],
        num_val_tasks=3,
    )
    datamodule.setup("fit")
    batch = datamodule.eval_batches("val")[0]
    assert "choice_input_ids" in batch.query
    torch.manual_seed(0)
    config = {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    learner = CausalLMLearner(
        model_config=config, tokenizer="embedded-bpe-512", dtype="float64", attn_implementation="eager"
    ).eval()
    figures, modules = {}, {}
    for meta_batch in ("task_by_task", "vmap", "auto"):
        algorithm = FOMAML(inner_lr=0.1, inner_steps=2)
        modules[meta_batch] = MetaLearningModule(learner, algorithm, meta_batch=meta_batch, eval_curve=[0, 1, 2])
        figures[meta_batch] = _figures(modules[meta_batch], batch)
    assert "val_accuracy_post" in figures["task_by_task"]
    assert list(modules["auto"].runner.verdicts.values()) == [""]  # auto runs the evaluation under vmap too
    for meta_batch in ("vmap", "auto"):
        assert figures[meta_batch].keys() == figures["task_by_task"].keys()
        for key, (mean, _, count) in figures["task_by_task"].items():
            assert figures[meta_batch][key][2] == count == len(batch), key
            torch.testing.assert_close(figures[meta_batch][key][0], mean, rtol=1e-10, atol=1e-12, msg=key)
