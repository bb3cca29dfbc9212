"""The causal-LM learner: second-order gradients, LoRA, tied embeddings, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_meta import CausalLMLearner, LoraSettings, TaskBatch
from lightning_meta.algorithms import FOMAML, MAML, inner_loop
from lightning_meta.learners.base import DataError, adapter_parameter_names, resolve_fast_weights

TOKENIZER = "embedded-bpe-512"
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_embd": 16,
    "n_head": 2,
    "n_positions": 32,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def tiny_learner(**options) -> CausalLMLearner:
    torch.manual_seed(0)
    return CausalLMLearner(model_config=TINY_GPT2, tokenizer=TOKENIZER, dtype="float64", **options)


def lm_batch(meta_batch_size: int = 2, shots: int = 2, queries: int = 2, length: int = 12, vocab: int = 512):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (meta_batch_size, shots + queries, length), generator=generator)
    split = lambda part: {"input_ids": part, "attention_mask": torch.ones_like(part), "labels": part.clone()}  # noqa: E731
    return TaskBatch(support=split(ids[:, :shots]), query=split(ids[:, shots:]), shots=shots)


def sampled_finite_differences(algorithm, learner, batch, names_and_indices, eps=1e-6):
    parameters = dict(learner.named_parameters())
    result = []
    for name, index in names_and_indices:
        flat = parameters[name].data.view(-1)
        original = flat[index].item()
        flat[index] = original + eps
        plus = algorithm.meta_loss(learner, batch).loss.item()
        flat[index] = original - eps
        minus = algorithm.meta_loss(learner, batch).loss.item()
        flat[index] = original
        result.append((plus - minus) / (2 * eps))
    return torch.tensor(result, dtype=torch.float64)


def coordinates(learner, names, per_name=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    parameters = dict(learner.named_parameters())
    return [
        (n, int(torch.randint(parameters[n].numel(), (), generator=generator))) for n in names for _ in range(per_name)
    ]


def test_second_order_gradient_matches_finite_differences_and_switches_to_eager():
    learner = tiny_learner()
    assert learner.transformer.config._attn_implementation == "sdpa"
    maml = MAML(inner_lr=0.5, inner_steps=2)
    batch = lm_batch()
    maml.meta_loss(learner, batch).loss.backward()  # would fail in SDPA's double backward
    assert learner.transformer.config._attn_implementation == "eager"
    names = [
        "model.transformer.wte.weight",
        "model.transformer.h.0.attn.c_attn.weight",
        "model.transformer.h.0.ln_1.weight",
        "model.transformer.ln_f.bias",
    ]
    picked = coordinates(learner, names)
    parameters = dict(learner.named_parameters())
    analytic = torch.tensor([parameters[n].grad.view(-1)[i].item() for n, i in picked], dtype=torch.float64)
    numeric = sampled_finite_differences(maml, learner, batch, picked)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)
    first_order = tiny_learner()
    FOMAML(inner_lr=0.5, inner_steps=2).meta_loss(first_order, batch).loss.backward()
    assert first_order.transformer.config._attn_implementation == "sdpa"  # first order keeps fused attention


def test_lora_inner_loop_adapts_only_adapters():
    learner = tiny_learner(lora=LoraSettings(r=2, alpha=4))
    assert learner.fast_weight_names and all("lora_" in n for n in learner.fast_weight_names)
    base_before = {n: p.detach().clone() for n, p in learner.named_parameters() if "lora_" not in n}
    episode = lm_batch().episode(0)
    adapted = inner_loop(learner, learner.fast_parameters(), episode.support, inner_lr=0.5, steps=3, create_graph=True)
    assert set(adapted) == set(learner.fast_weight_names)
    assert any(not torch.equal(adapted[n], p) for n, p in learner.fast_parameters().items())
    for name, parameter in learner.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, base_before[name]), name  # bitwise
            assert not parameter.requires_grad


def test_lora_settings_as_a_dict_from_python_as_a_config_writes_them():
    learner = tiny_learner(lora={"r": 2, "alpha": 4})
    assert learner.lora == LoraSettings(r=2, alpha=4)
    assert learner.fast_weight_names == tiny_learner(lora=LoraSettings(r=2, alpha=4)).fast_weight_names
    with pytest.raises(ValueError, match=r"lora: unknown settings \['rank'\]; LoraSettings has \['r', 'alpha'"):
        tiny_learner(lora={"rank": 2})


def test_lora_fast_weights_are_the_adapters_peft_declares_not_names_containing_lora():
    learner = tiny_learner(lora=LoraSettings(r=2, alpha=4))
    declared = adapter_parameter_names(learner.model)
    assert declared and set(learner.fast_weight_names) == declared
    assert all(".lora_A." in name or ".lora_B." in name for name in declared)
    # A trainable base parameter whose name merely contains "lora_" is not an adapter.
    impostor = nn.Parameter(torch.zeros(2))
    learner.model.base_model.model.transformer.register_parameter("lora_scale", impostor)
    assert "base_model.model.transformer.lora_scale" not in adapter_parameter_names(learner.model)
    assert "base_model.model.transformer.lora_scale" not in resolve_fast_weights(learner.model, "lora")


def test_lora_second_order_matches_finite_differences():
    learner = tiny_learner(lora=LoraSettings(r=2, alpha=4))
    # LoRA's B starts at zero; perturb it so that the adapters' gradients are not trivially structured.
    with torch.no_grad():
        for name, parameter in learner.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    maml = MAML(inner_lr=0.5, inner_steps=1)
    batch = lm_batch(meta_batch_size=1)
    maml.meta_loss(learner, batch).loss.backward()
    picked = coordinates(learner, [f"model.{name}" for name in learner.fast_weight_names[:4]], per_name=2)
    parameters = dict(learner.named_parameters())
    analytic = torch.tensor([parameters[n].grad.view(-1)[i].item() for n, i in picked], dtype=torch.float64)
    numeric = sampled_finite_differences(maml, learner, batch, picked)
    torch.testing.assert_close(analytic, numeric, rtol=1e-4, atol=1e-8)


def test_meta_learn_base_trains_base_weights_in_the_outer_loop_only():
    learner = tiny_learner(lora=LoraSettings(r=2, alpha=4), meta_learn_base=True)
    assert all("lora_" in n for n in learner.fast_weight_names)
    FOMAML(inner_lr=0.5).meta_loss(learner, lm_batch()).loss.backward()
    base = dict(learner.model.named_parameters())["base_model.model.transformer.h.0.mlp.c_fc.weight"]
    assert base.requires_grad and base.grad is not None and base.grad.abs().sum() > 0


def test_tied_embeddings_stay_tied_through_adaptation_and_outer_steps():
    learner = tiny_learner()
    transformer = learner.transformer
    assert transformer.lm_head.weight is transformer.transformer.wte.weight
    assert "transformer.wte.weight" in learner.fast_weight_names and "lm_head.weight" not in learner.fast_weight_names
    episode = lm_batch().episode(0)
    adapted = FOMAML(inner_lr=0.5, inner_steps=2).adapt(learner, episode.support)
    reference = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, value in adapted.items():
            reference.get_parameter(name).copy_(value)
    assert reference.lm_head.weight is reference.transformer.wte.weight
    expected = reference(input_ids=episode.query["input_ids"]).logits
    torch.testing.assert_close(learner.predict(episode.query, adapted), expected)

    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    MAML(inner_lr=0.5).meta_loss(learner, lm_batch()).loss.backward()
    optimizer.step()
    assert transformer.lm_head.weight is transformer.transformer.wte.weight


@pytest.mark.parametrize("algorithm", [FOMAML(inner_lr=0.5, inner_steps=2), MAML(inner_lr=0.5, inner_steps=2)])
def test_gradient_checkpointing_gives_the_same_meta_gradient(algorithm):
    batch = lm_batch()
    gradients = []
    for checkpointing in (False, True):
        learner = tiny_learner(gradient_checkpointing=checkpointing, attn_implementation="eager")
        learner.train()
        algorithm.meta_loss(learner, batch).loss.backward()
        gradients.append({n: p.grad for n, p in learner.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_loss_ignores_padding():
    learner = tiny_learner()
    episode = lm_batch().episode(0)
    padded = {k: torch.cat([v, v[:, :4]], dim=1) for k, v in episode.support.items()}
    padded["attention_mask"][:, -4:] = 0
    padded["labels"][:, -4:] = -100
    loss, _ = learner.loss(episode.support)
    padded_loss, _ = learner.loss(padded)
    torch.testing.assert_close(loss, padded_loss)


def test_clear_errors():
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        CausalLMLearner()
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        CausalLMLearner(pretrained="gpt2")
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        CausalLMLearner(model_config={"n_layer": 1}, tokenizer=TOKENIZER)
    with pytest.raises(ValueError, match="fast_weights='lora' but the model has no trainable LoRA adapters"):
        tiny_learner(fast_weights="lora")
    learner = tiny_learner()
    fine = {"input_ids": torch.ones(2, 1, 4, dtype=torch.long), "attention_mask": torch.ones(2, 1, 4, dtype=torch.long)}
    too_big = dict(fine, input_ids=torch.tensor([1, 10_000]).view(2, 1, 1).expand(2, 1, 4))
    learner.check_data(TaskBatch(support=fine, query=fine))
    outside = r"Episode 1 of the batch \(1 of 2 episodes\): query\['input_ids'\] has token ids outside"
    with pytest.raises(DataError, match=outside):
        learner.check_data(TaskBatch(support=fine, query=too_big))
    bad_labels = dict(fine, labels=torch.full((2, 1, 4), -7))
    with pytest.raises(DataError, match=r"support\['labels'\] has labels that are neither token ids .* nor -100"):
        learner.check_data(TaskBatch(support=bad_labels, query=fine))


def test_fast_weight_subsets_on_a_transformer():
    torch.manual_seed(0)
    config = dict(TINY_GPT2, n_layer=3)
    last = CausalLMLearner(model_config=config, tokenizer=TOKENIZER, fast_weights="last_blocks:1")
    assert last.fast_weight_names and all(n.startswith("transformer.h.2.") for n in last.fast_weight_names)
    norms = CausalLMLearner(model_config=config, tokenizer=TOKENIZER, fast_weights="biases_norms")
    assert (
        "transformer.ln_f.weight" in norms.fast_weight_names
        and "transformer.h.0.attn.c_attn.bias" in norms.fast_weight_names
    )
    assert not any(n.endswith("c_attn.weight") for n in norms.fast_weight_names)


def test_module_with_lora_learner_round_trips_through_a_checkpoint(tmp_path):
    import lightning as L

    from lightning_meta import MetaLearningModule
    from lightning_meta.datamodules import LanguageModelingTasksDataModule

    learner = CausalLMLearner(
        model_config=TINY_GPT2, tokenizer=TOKENIZER, lora=LoraSettings(r=2, alpha=4), meta_learn_base=True
    )
    module = MetaLearningModule(learner, FOMAML(inner_lr=0.5, eval_inner_steps=2))
    datamodule = LanguageModelingTasksDataModule(
        tokenizer=TOKENIZER,
        block_size=16,
        shots=2,
        queries=2,
        meta_batch_size=2,
        num_val_tasks=2,
        num_test_tasks=2,
        max_tokens_per_domain=2000,
    )
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = MetaLearningModule.load_from_checkpoint(tmp_path / "lm.ckpt")
    assert loaded.learner.lora == LoraSettings(r=2, alpha=4) and loaded.learner.meta_learn_base
    assert loaded.learner.fast_weight_names == module.learner.fast_weight_names
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "fast_weights", ["all", "head", "last_blocks:1", "biases_norms", ["transformer.h.0.mlp.*"], "lora"]
)
def test_gradient_checkpointing_with_every_fast_weight_choice(fast_weights, monkeypatch):
    """Checkpointed blocks recompute with the adapted weights, LoRA's included (peft renames the layers)."""
    import lightning_meta.learners.transformer_models as transformer_models

    checkpointed = []
    monkeypatch.setattr(
        transformer_models, "checkpoint", lambda *args, **kwargs: checkpointed.append(1) or checkpoint(*args, **kwargs)
    )
    lora = {"lora": LoraSettings(r=2, alpha=4), "meta_learn_base": True} if fast_weights == "lora" else {}
    batch = lm_batch()
    gradients = []
    for checkpointing in (False, True):
        learner = tiny_learner(
            gradient_checkpointing=checkpointing, attn_implementation="eager", fast_weights=fast_weights, **lora
        )
        MAML(inner_lr=0.5, inner_steps=2).meta_loss(learner, batch).loss.backward()
        gradients.append({n: p.grad for n, p in learner.named_parameters() if p.grad is not None})
    assert checkpointed  # the blocks did run checkpointed
    assert gradients[1].keys() == gradients[0].keys() and gradients[0]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


TINY_LLAMA = {
    "model_type": "llama",
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 32,
}


@pytest.mark.parametrize("config, lora", [(TINY_GPT2, None), (TINY_LLAMA, LoraSettings(r=2))])
def test_logits_run_only_where_read_and_equal_the_full_logits_there(config, lora):
    torch.manual_seed(0)
    learner = CausalLMLearner(model_config=config, tokenizer=TOKENIZER, dtype="float64", lora=lora)
    ids = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]  # outputs at the end of a row (MetaICL, MultiTask), none in row 1
    labels[2, 3:5] = ids[2, 3:5]
    split = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows = []
    learner.transformer.get_output_embeddings().register_forward_hook(lambda m, i, out: rows.append(out.shape[-2]))
    weights = [p for p in learner.parameters() if p.requires_grad]

    full = learner.predict(split)[:, :-1]  # the plain computation: every position, then read
    read = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(full[read], labels[:, 1:][read])
    expected_gradients = torch.autograd.grad(expected, weights)
    found, _ = learner.loss(split)
    found_gradients = torch.autograd.grad(found, weights)
    assert rows[-1] == int(read.sum()) == 6  # the head ran on the 6 read positions, not on 3 x 10

    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-14)
    for gradient, reference in zip(found_gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-10, atol=1e-13)
    gathered = learner.read_logits(learner.model_inputs(split), labels[:, 1:])
    torch.testing.assert_close(gathered.logits, full[read].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gathered.logits.log_softmax(-1), full[read].log_softmax(-1).detach())
    figures = learner.evaluation_metrics(split)
    greedy = (full.argmax(-1) == labels[:, 1:]) | ~read
    assert figures["exact_match"] == greedy.all(1).float().mean()
    torch.testing.assert_close(figures["loss"], expected.detach())


def test_generate_is_greedy_decoding_as_transformers_generates_it():
    """CausalLMLearner.generate (at the learner's own weights, through its functional forward) writes the tokens
    transformers' greedy ``generate`` writes, stopping at the end token (left out) or the token budget."""
    torch.manual_seed(0)
    learner = CausalLMLearner(model_config=TINY_GPT2 | {"n_positions": 64}, tokenizer=TOKENIZER, dtype="float64").eval()
    for prompt in ([5, 17, 3], [40, 2, 9, 11, 30]):
        expected = learner.transformer.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=learner.transformer.config.eos_token_id,
        )[0, len(prompt) :].tolist()
        eos = learner.transformer.config.eos_token_id
        expected = expected[: expected.index(eos)] if eos in expected else expected
        assert learner.generate(torch.tensor(prompt), None, 12) == expected
