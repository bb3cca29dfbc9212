"""Learners loaded from a folder train like built ones, and sequences longer than the model reads are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_meta import CausalLMLearner, EncoderLearner, MetaLearningModule, TaskBatch
from lightning_meta.algorithms import FOMAML
from lightning_meta.datamodules import LanguageModelingTasksDataModule
from lightning_meta.learners.encoders import build_encoder

TOKENIZER = "embedded-bpe-512"
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32}
BERT = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
    "hidden_dropout_prob": 0.5,
}


def token_batch(length: int, vocab: int = 500, labels: bool = False) -> TaskBatch:
    ids = torch.randint(0, vocab, (2, 4, length), generator=torch.Generator().manual_seed(0))
    split = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        split["labels"] = torch.arange(4).expand(2, 4) % 2
    return TaskBatch(support=split, query=split, ways=2, shots=2)


def causal_lm_from_folder(tmp_path) -> CausalLMLearner:
    CausalLMLearner(model_config=dict(GPT2, resid_pdrop=0.5), tokenizer=TOKENIZER).model.save_pretrained(tmp_path)
    return CausalLMLearner(pretrained=str(tmp_path), tokenizer=TOKENIZER)


def encoder_from_folder(tmp_path) -> EncoderLearner:
    build_encoder(encoder_config=BERT).save_pretrained(tmp_path)
    return EncoderLearner(encoder_path=str(tmp_path), ways=2)


@pytest.mark.parametrize("make", [causal_lm_from_folder, encoder_from_folder], ids=["causal_lm", "encoder"])
def test_a_learner_from_a_folder_trains_with_dropout_like_one_built_from_a_config(tmp_path, make):
    learner = make(tmp_path)  # from_pretrained gives eval mode; the learner must not keep it
    batch = token_batch(12, labels=isinstance(learner, EncoderLearner))
    episode = next(iter(batch.episodes()))
    assert all(module.training for module in learner.modules())
    assert not torch.equal(learner.loss(episode.query)[0], learner.loss(episode.query)[0])  # dropout draws
    learner.eval()  # and Lightning's evaluation turns it off as for any module
    torch.testing.assert_close(learner.loss(episode.query)[0], learner.loss(episode.query)[0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: CausalLMLearner(model_config=GPT2, tokenizer=TOKENIZER),
        lambda: EncoderLearner(encoder_config=BERT, ways=2),
    ],
    ids=["causal_lm", "encoder"],
)
def test_sequences_longer_than_the_model_reads_are_refused_by_name(make):
    learner = make()
    assert learner.max_positions == 32
    FOMAML(inner_lr=0.1).meta_loss(learner, token_batch(32, labels=isinstance(learner, EncoderLearner)))
    with pytest.raises(
        ValueError,
        match=r"sequence length=40 is longer than the model's 32 positions: lower the "
        r"datamodule's max_length \(or block_size\) to 32 or less",
    ):
        FOMAML(inner_lr=0.1).meta_loss(learner, token_batch(40, labels=isinstance(learner, EncoderLearner)))


def test_the_host_refuses_a_datamodule_length_beyond_the_model_before_any_step(tmp_path):
    module = MetaLearningModule(CausalLMLearner(model_config=GPT2, tokenizer=TOKENIZER), FOMAML(inner_lr=0.1))
    data = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER, block_size=48, shots=1, queries=1, meta_batch_size=1, max_tokens_per_domain=2000
    )
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(
        ValueError,
        match=r"block_size=48 is longer than the model's 32 positions: lower "
        r"--data.init_args.block_size to 32 or less",
    ):
        trainer.fit(module, data)
