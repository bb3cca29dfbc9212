"""MultiTask: the joint-training baseline's gradient is the plain loss's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_meta import CausalLMLearner, TaskBatch
from lightning_meta.algorithms import MultiTask, get
from lightning_meta.algorithms.multi_task import joint_loss
from lightning_meta.data.tasks import IGNORE_INDEX, padded

from conftest import classification_batch, regression_batch, tiny_language_models


def _plain_gradient(learner, batch: TaskBatch, loss_of) -> list[torch.Tensor]:
    """∇ of the mean over tasks of the loss on all of a task's examples, computed from the model directly."""
    params = dict(learner.model.named_parameters())
    losses = []
    for index in range(len(batch)):
        x = torch.cat([batch.support["x"][index], batch.query["x"][index]])
        y = torch.cat([batch.support["y"][index], batch.query["y"][index]])
        losses.append(loss_of(functional_call(learner.model, params, (x,)), y))
    return torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))


@pytest.mark.parametrize("meta_batch", ["task_by_task", "all_at_once", "vmap"])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_gradient_is_the_plain_loss_gradient_over_support_and_query(kind, meta_batch, mlp_learner, classifier):
    learner, batch, loss_of = {
        "regression": (mlp_learner, regression_batch(), F.mse_loss),
        "classification": (classifier, classification_batch(), F.cross_entropy),
    }[kind]
    expected = _plain_gradient(learner, batch, loss_of)

    algorithm = MultiTask(inner_lr=0.1)
    algorithm.report_query = True  # as the host sets it on the steps it logs
    out = algorithm.meta_loss(learner, batch, meta_batch=meta_batch)
    out.loss.backward()

    for parameter, gradient in zip(learner.model.parameters(), expected, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-12, atol=1e-12)
    query_losses = [learner.loss(episode.query)[0] for episode in batch.episodes()]
    torch.testing.assert_close(out.metrics["query_loss"], torch.stack(query_losses).mean().detach())
    assert ("query_accuracy" in out.metrics) == (kind == "classification")


LANGUAGE_MODELS = tiny_language_models(layers=1, positions=64)


def _text_split(lengths: list[list[int]], outputs: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Right-padded examples cut to their split's longest (rounded up to 8), the last ``outputs`` tokens labelled."""
    real = torch.tensor(lengths)
    width = -(-int(real.max()) // 8) * 8
    positions = torch.arange(width)
    mask = (positions < real[..., None]).long()
    ids = torch.randint(3, 500, mask.shape, generator=generator) * mask
    labelled = (positions >= real[..., None] - outputs) & mask.bool()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~labelled, IGNORE_INDEX)}


@pytest.mark.parametrize(
    ("model_type", "meta_batch"), [("gpt2", "task_by_task"), ("gpt2", "vmap"), ("llama", "task_by_task")]
)
def test_a_language_model_s_loss_is_the_token_mean_over_support_and_query_whatever_their_widths(model_type, meta_batch):
    torch.manual_seed(0)
    learner = CausalLMLearner(
        model_config=LANGUAGE_MODELS[model_type],
        tokenizer="embedded-bpe-512",
        dtype="float64",
        attn_implementation="eager",
    )
    generator = torch.Generator().manual_seed(0)
    # Cut per split as the datamodules collate: the support 8 positions wide, the query 24; outputs of 1 to 6 tokens.
    support, query = _text_split([[4, 6, 5], [7, 3, 6]], 2, generator), _text_split([[20, 9], [11, 17]], 6, generator)
    batch = TaskBatch(support, query)
    parameters = list(learner.parameters())

    # Independent: every example alone and unpadded, the output tokens' summed cross-entropy over their count.
    task_losses = []
    for index in range(len(batch)):
        total, count = 0, 0
        for split in (support, query):
            fields = (split[name][index] for name in ("input_ids", "attention_mask", "labels"))
            for ids, mask, labels in zip(*fields, strict=True):
                length = int(mask.sum())
                logits = learner.model(input_ids=ids[None, :length]).logits[0, :-1]
                targets = labels[1:length]
                total = total + F.cross_entropy(logits, targets.clamp_min(0), reduction="none")[targets >= 0].sum()
                count += int((targets >= 0).sum())
        task_losses.append(total / count)
    expected = torch.stack(task_losses).mean()
    expected_gradients = torch.autograd.grad(expected, parameters)

    # Batched against single forwards in float64: ~1e-11 apart, but transformers runs Llama's rotary embedding in
    # float32, whose vectorised cos rounds by the width (1e-8). Weighting splits by example count was off by 1e-4.
    rtol, atol = (1e-9, 1e-12) if model_type == "gpt2" else (1e-6, 1e-9)
    for case in (batch, TaskBatch(*(padded(split, {"attention_mask": 40}) for split in (support, query)))):
        out = MultiTask().meta_loss(learner, case, meta_batch=meta_batch)
        torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=rtol, atol=0)
        for found, want in zip(torch.autograd.grad(out.loss, parameters), expected_gradients, strict=True):
            torch.testing.assert_close(found, want, rtol=rtol, atol=atol)


def test_splits_join_on_the_fields_both_have(mlp_learner):
    """Splits with different fields (here a query-only one): still the mean loss over all the examples."""
    episode = regression_batch(meta_batch_size=1, shots=2, queries=5).episode(0)
    query = episode.query | {"task_id": torch.zeros(5)}

    every_error = torch.cat([mlp_learner.predict(split) - split["y"] for split in (episode.support, query)])
    torch.testing.assert_close(joint_loss(mlp_learner, episode.support, query), every_error.pow(2).mean())


def test_adapts_with_sgd_steps_like_maml_and_is_found_by_name(mlp_learner):
    algorithm = get("multitask", inner_lr=0.05, eval_inner_steps=3)
    assert isinstance(algorithm, MultiTask) and algorithm.evaluation_steps() == 3
    episode = regression_batch().episode(0)
    weights = {name: weight.detach() for name, weight in mlp_learner.fast_parameters().items()}
    for _ in range(3):
        loss, _ = mlp_learner.loss(episode.support, {name: w.requires_grad_() for name, w in weights.items()})
        gradients = torch.autograd.grad(loss, list(weights.values()))
        weights = {name: (w - 0.05 * g).detach() for (name, w), g in zip(weights.items(), gradients, strict=True)}
    adapted = algorithm.adapt(mlp_learner, episode.support)
    for name, weight in weights.items():
        torch.testing.assert_close(adapted[name], weight)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="inner_steps must be an integer >= 1, got 0"):
        MultiTask(inner_steps=0)


def test_channel_multitask_trains_and_adapts_on_the_channel_sequences():
    """``MultiTask(direction="channel")``: the joint loss over the channel sequences (output, then input, the loss on
    the input), and evaluation adapts on the support's channel sequences; without them, one line naming the flag."""
    from lightning_meta.data.tasks import CHANNEL_SEQUENCE_FIELDS, Episode

    torch.manual_seed(0)
    config = {
        "model_type": "gpt2",
        "n_layer": 1,
        "n_embd": 16,
        "n_head": 2,
        "n_positions": 32,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }
    model = CausalLMLearner(model_config=config, tokenizer="embedded-bpe-512", dtype="float64")

    def rows(tokens: list[list[int]], starts: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([row + [0] * (8 - len(row)) for row in tokens])
        mask = torch.tensor([[1] * len(row) + [0] * (8 - len(row)) for row in tokens])
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[torch.arange(8)[None] < torch.tensor(starts)[:, None]] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    direct = [rows([[11, 12, 21, 2], [13, 22, 23, 2]], [2, 1]), rows([[14, 15, 16, 24, 2]], [3])]
    channel = [rows([[21, 9, 11, 12, 2], [22, 23, 9, 13, 2]], [2, 3]), rows([[24, 9, 14, 15, 16, 2]], [2])]
    support, query = (
        split
        | {
            name: rows_[key]
            for name, key in zip(CHANNEL_SEQUENCE_FIELDS, ("input_ids", "attention_mask", "labels"), strict=True)
        }
        for split, rows_ in zip(direct, channel, strict=True)
    )
    episode = Episode(support, query)
    loss = MultiTask(direction="channel").meta_loss(model, TaskBatch.stack([episode])).loss
    torch.testing.assert_close(loss, joint_loss(model, *channel), rtol=1e-12, atol=1e-12)
    assert not torch.isclose(loss, MultiTask().meta_loss(model, TaskBatch.stack([episode])).loss)
    adapted = list(MultiTask(direction="channel", inner_lr=0.5).adapt_steps(model, support, 1))[0]
    expected = list(MultiTask(inner_lr=0.5).adapt_steps(model, channel[0], 1))[0]
    for name, weight in adapted.items():
        torch.testing.assert_close(weight, expected[name])
    with pytest.raises(
        ValueError,
        match=r"MultiTask\(direction='channel'\) needs the channel sequences .* "
        r"--data.init_args.channel=true",
    ):
        MultiTask(direction="channel").meta_loss(model, TaskBatch.stack([Episode(*direct)]))
