"""Every registered algorithm's loss and meta-gradient are those of the real tokens: padding columns change nothing."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import CausalLMLearner, EncoderLearner, TaskBatch
from lightning_meta.algorithms import available
from lightning_meta.data.tasks import IGNORE_INDEX, padded

TOKENIZER = "embedded-bpe-512"
GPT2 = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_embd": 16,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
BERT = {
    "model_type": "bert",
    "vocab_size": 512,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
# Real lengths (episodes, examples): the support is collated 16 positions wide, the query 24 (as batches are
# cut per split), and both hold a few output tokens at the end of each example.
SUPPORT_LENGTHS, QUERY_LENGTHS = [[5, 9, 6], [3, 12, 8]], [[7, 20], [10, 4]]


def _split(lengths: list[list[int]], generator: torch.Generator, classes: bool) -> dict[str, torch.Tensor]:
    real = torch.tensor(lengths)
    width = -(-int(real.max()) // 8) * 8
    mask = (torch.arange(width) < real[..., None]).long()
    ids = torch.randint(3, 500, mask.shape, generator=generator) * mask
    if classes:  # one class per example, each present in every support (ProtoNet)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(real.shape[1]).expand_as(real) % 2}
    outputs = (torch.arange(width) >= real[..., None] - 3) & mask.bool()  # the last three real tokens
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(~outputs, IGNORE_INDEX)}


def _learner_and_batch(algorithm) -> tuple[torch.nn.Module, TaskBatch]:
    """A float64 causal LM with text-to-text episodes; a classifying encoder where the algorithm needs classes."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    learner = CausalLMLearner(model_config=GPT2, tokenizer=TOKENIZER, dtype="float64", attn_implementation="eager")
    try:
        algorithm.check_learner(learner)
        classes = False
    except ValueError:
        learner, classes = EncoderLearner(encoder_config=BERT).double(), True
    batch = TaskBatch(
        _split(SUPPORT_LENGTHS, generator, classes),
        _split(QUERY_LENGTHS, generator, classes),
        ways=2 if classes else None,
    )
    return learner, batch


def _loss_and_meta_gradient(algorithm, learner, batch: TaskBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    parameters = [p for module in (learner, algorithm) for p in module.parameters() if p.requires_grad]
    out = algorithm.meta_loss(learner, batch, meta_batch="task_by_task")
    gradients = torch.autograd.grad(out.loss, parameters, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, gradients, strict=True)]
    return out.loss.detach(), gradients


@pytest.mark.parametrize("name", sorted(available()))
@pytest.mark.parametrize("extra", [(8, 8), (24, 16)], ids=["different_widths", "one_width"])
def test_padding_columns_change_neither_the_loss_nor_the_meta_gradient(name, extra):
    algorithm = available()[name]()
    learner, batch = _learner_and_batch(algorithm)
    algorithm.bind(learner)
    widened = TaskBatch(
        *(
            padded(split, {"attention_mask": split["attention_mask"].shape[-1] + more})
            for split, more in zip((batch.support, batch.query), extra, strict=True)
        ),
        ways=batch.ways,
    )
    widths = [split["input_ids"].shape[-1] for split in (widened.support, widened.query)]
    assert widths == [16 + extra[0], 24 + extra[1]]
    assert torch.equal(widened.without_padding().query["input_ids"], batch.query["input_ids"])
    loss, gradients = _loss_and_meta_gradient(algorithm, learner, batch)
    widened_loss, widened_gradients = _loss_and_meta_gradient(algorithm, learner, widened)
    torch.testing.assert_close(widened_loss, loss, rtol=1e-12, atol=0)
    for found, expected in zip(widened_gradients, gradients, strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-13)
