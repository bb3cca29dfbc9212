"""Options scored once per prompt (cached keys and values) equal one full forward per option (float64)."""

from __future__ import annotations

import functools

import pytest
import torch

from lightning_meta import CausalLMLearner, LoraSettings
from lightning_meta.data.tasks import (
    ANSWER,
    CHOICE_ATTENTION_MASK,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    IGNORE_INDEX,
    Choices,
)

from conftest import tiny_language_models

TOKENIZER = "embedded-bpe-512"
MODELS = tiny_language_models(layers=2, positions=64)
PROMPTS = [[11, 12, 13, 14, 15], [16], [17, 18, 19]]  # one prompt of a single token: nothing to share
OPTIONS = [[[21, 2], [22, 23, 24, 2], [25, 26, 2]], [[27, 2], [28, 29, 2], []], [[30, 31, 32, 33, 34, 2], [35, 2], []]]
WIDTH = 16


def choices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(examples, options, tokens): each option after its prompt, right-padded; [] is a padding option."""
    shape = (len(PROMPTS), 3, WIDTH)
    ids, mask, labels = (
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
        torch.full(shape, IGNORE_INDEX),
    )
    for row, (prompt, options) in enumerate(zip(PROMPTS, OPTIONS, strict=True)):
        for column, option in enumerate(options):
            if option:
                tokens = prompt + option
                ids[row, column, : len(tokens)] = torch.tensor(tokens)
                mask[row, column, : len(tokens)] = 1
                labels[row, column, len(prompt) : len(tokens)] = torch.tensor(option)
    return ids, mask, labels


def one_forward_per_option(model: CausalLMLearner, params=None) -> torch.Tensor:
    scores = torch.full((len(PROMPTS), 3), -torch.inf, dtype=torch.float64)
    for row, (prompt, options) in enumerate(zip(PROMPTS, OPTIONS, strict=True)):
        for column, option in enumerate(options):
            if option:
                ids = torch.tensor([prompt + option])
                with torch.no_grad():
                    logits = model.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, params)
                log_probs = torch.log_softmax(logits[0], -1)
                scores[row, column] = sum(log_probs[len(prompt) + i - 1, t] for i, t in enumerate(option))
    return scores


@pytest.mark.parametrize("model_type", sorted(MODELS))
@pytest.mark.parametrize("variant", ["plain", "fast_weights", "lora"])
def test_cached_prompt_scores_equal_one_full_forward_per_option(model_type, variant):
    torch.manual_seed(0)
    lora = LoraSettings(r=2) if variant == "lora" else None
    model = CausalLMLearner(model_config=MODELS[model_type], tokenizer=TOKENIZER, dtype="float64", lora=lora)
    model.eval()
    params = None
    if variant != "plain":  # fast weights different from the module's own, passed functionally
        params = {
            name: weight.detach() + 0.05 * torch.randn_like(weight) for name, weight in model.fast_parameters().items()
        }
    expected = one_forward_per_option(model, params)
    with torch.no_grad():
        scores, greedy = model.option_scores(*choices(), params)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    assert not greedy[torch.isinf(expected)].any()


def test_left_padded_options_score_as_the_unpadded_sequences():
    """Rows padded on the left (a tokenizer's ``padding_side='left'``) score as the right-padded ones: each option
    after its prompt alone, not 0 with greedy decoding "writing" every option."""
    torch.manual_seed(0)
    model = CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, dtype="float64").eval()
    ids, mask, labels = choices()
    shifts = WIDTH - mask.sum(-1, keepdim=True)  # each row's real tokens moved to its end
    order = (torch.arange(WIDTH) - shifts) % WIDTH
    left = [tensor.gather(-1, order) for tensor in (ids, mask, labels)]
    assert torch.equal(left[1][..., -1], mask.any(-1).long())  # every row with tokens ends on a real one
    expected = one_forward_per_option(model)
    with torch.no_grad():
        _, right_greedy = model.option_scores(ids, mask, labels)
        scores, greedy = model.option_scores(*left)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(greedy, right_greedy) and not greedy.all()


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_options_score_under_vmap_as_in_the_loop(model_type):
    """``parallel=True`` (episodes evaluated together under vmap): a forward per option, no host sync, same figures."""
    torch.manual_seed(0)
    model = CausalLMLearner(
        model_config=MODELS[model_type], tokenizer=TOKENIZER, dtype="float64", attn_implementation="eager"
    ).eval()
    ids, mask, labels = choices()
    split = {
        "input_ids": ids[:, 0],
        "attention_mask": mask[:, 0],
        "labels": labels[:, 0],
        CHOICE_INPUT_IDS: ids,
        CHOICE_ATTENTION_MASK: mask,
        CHOICE_LABELS: labels,
        ANSWER: torch.tensor([1, -1, 0]),
    }
    episodes = {name: torch.stack([tensor, tensor.flip(0)]) for name, tensor in split.items()}  # two episodes
    expected = one_forward_per_option(model)
    with torch.no_grad():
        scores, greedy = torch.func.vmap(functools.partial(model.option_scores, parallel=True))(
            *(episodes[name] for name in (CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS))
        )
        figures = torch.func.vmap(lambda episode: model.evaluation_metrics(episode, parallel=True))(episodes)
        looped = [
            model.evaluation_metrics({name: tensor[index] for name, tensor in episodes.items()}) for index in range(2)
        ]
        cached_greedy = model.option_scores(ids, mask, labels)[1]
    # transformers runs Llama's rotary embedding in float32, whose vectorised cos rounds by the width (~1e-9 here).
    tolerance = 1e-12 if model_type == "gpt2" else 1e-8
    torch.testing.assert_close(scores, torch.stack([expected, expected.flip(0)]), rtol=tolerance, atol=tolerance)
    assert torch.equal(greedy, torch.stack([cached_greedy, cached_greedy.flip(0)]))
    for name, values in figures.items():
        torch.testing.assert_close(values, torch.stack([figure[name] for figure in looped]), msg=name)


def test_the_prompt_runs_once():
    torch.manual_seed(0)
    model = CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, dtype="float64")
    positions: list[int] = []
    handle = model.transformer.transformer.wte.register_forward_hook(
        lambda module, inputs, output: positions.append(inputs[0].numel())
    )
    with torch.no_grad():
        model.option_scores(*choices())
    handle.remove()
    # One forward of the 3 prompts less their last token (4 positions), one of the 9 continuations (7 positions).
    assert positions == [3 * 4, 9 * 7]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_sums_log_probabilities_and_accuracy_per_token_divides_by_the_option_length(seed):
    torch.manual_seed(seed)
    model = CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, dtype="float64").eval()
    summed = one_forward_per_option(model)  # independent: one forward per option
    lengths = torch.tensor(
        [[max(len(option), 1) for option in options + [[]] * (3 - len(options))] for options in OPTIONS],
        dtype=torch.float64,
    )
    by_sum, by_token = summed.argmax(1), (summed / lengths).argmax(1)
    assert (by_sum != by_token).any()  # the two rules disagree somewhere: the test tells them apart
    ids, mask, labels = choices()
    split = {
        "input_ids": ids[:, 0],
        "attention_mask": mask[:, 0],
        "labels": labels[:, 0],
        CHOICE_INPUT_IDS: ids,
        CHOICE_ATTENTION_MASK: mask,
        CHOICE_LABELS: labels,
    }
    for answer in (by_sum, by_token):
        figures = model.evaluation_metrics(split | {ANSWER: answer})
        assert float(figures["accuracy"]) == pytest.approx(float((by_sum == answer).double().mean()))
        assert float(figures["accuracy_per_token"]) == pytest.approx(float((by_token == answer).double().mean()))


def test_an_option_scores_its_own_tokens_given_the_prompt_without_the_end_token(tmp_path):
    """Rank classification as BIG-bench (``cond_log_prob``) and lm-eval (``acc``) define it: an option's score is
    the summed log-probability of the option's own tokens given the prompt, no end token, as one full forward of
    the prompt's and the option's tokens (each tokenized on its own) gives it (float64)."""
    import json

    from lightning_meta.data.tokenization import load_tokenizer
    from lightning_meta.datamodules import TextToTextTasksDataModule

    options = ["no", "yes", "maybe not"]
    rows = [
        {"task": "t", "input": f"question {index}", "output": options[index % 3], "options": options}
        for index in range(8)
    ]
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)))
    module = TextToTextTasksDataModule(
        tokenizer=TOKENIZER, dataset=str(tmp_path / "t.jsonl"), template="Q: {input}\nA:", max_length=32
    )
    task = module.tasks["t"]
    torch.manual_seed(0)
    model = CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, dtype="float64").eval()
    with torch.no_grad():
        scores, _ = model.option_scores(task.choice_input_ids, task.choice_attention_mask, task.choice_labels)
    tokenizer = load_tokenizer(TOKENIZER)
    for example, row in enumerate(rows):
        prompt = tokenizer(f"Q: {row['input']}\nA:", add_special_tokens=False)["input_ids"]
        for column, option in enumerate(options):
            tokens = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + tokens])
            with torch.no_grad():
                logits = model.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0]
            log_probs = torch.log_softmax(logits, -1)
            expected = sum(log_probs[len(prompt) + i - 1, token] for i, token in enumerate(tokens))
            torch.testing.assert_close(scores[example, column], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoding", ["choices", "answer index"])
@pytest.mark.parametrize("parallel", [False, True])
def test_every_scoring_rule_and_the_correct_probability_match_an_independent_computation(parallel, encoding):
    """``accuracy_sum``, ``accuracy_per_token``, ``accuracy_per_char`` (lm-eval's acc_norm: divided by the option's
    characters) and ``correct_probability`` (softmax of the sums over the example's options) from one forward per
    option (float64); ``scoring`` picks which is ``accuracy``; under vmap (``parallel``) the same; a split written
    by ``Choices.fields`` (the datamodules') and one of an earlier version (the right option's index) alike."""
    from lightning_meta.data.tasks import CHOICE_CHARACTERS, CORRECT

    torch.manual_seed(3)
    model = CausalLMLearner(
        model_config=MODELS["gpt2"],
        tokenizer=TOKENIZER,
        dtype="float64",
        attn_implementation="eager",
        scoring="per_char",
    ).eval()
    summed = one_forward_per_option(model)
    tokens = torch.tensor(
        [[max(len(option), 1) for option in options + [[]] * (3 - len(options))] for options in OPTIONS],
        dtype=torch.float64,
    )
    characters = torch.tensor([[3.0, 17.0, 4.0], [9.0, 2.0, 0.0], [30.0, 1.0, 0.0]])
    correct = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    ids, mask, labels = choices()
    split = {
        "input_ids": ids[:, 0],
        "attention_mask": mask[:, 0],
        "labels": labels[:, 0],
        CHOICE_INPUT_IDS: ids,
        CHOICE_ATTENTION_MASK: mask,
        CHOICE_LABELS: labels,
        ANSWER: correct.float().argmax(1),
        CORRECT: correct,
        CHOICE_CHARACTERS: characters,
    }
    if encoding == "choices":
        split = {name: tensor for name, tensor in split.items() if name != ANSWER} | Choices.read(split).fields()
        assert ANSWER not in split
    with torch.no_grad():
        if parallel:
            episodes = {name: tensor[None] for name, tensor in split.items()}
            figures = torch.func.vmap(lambda episode: model.evaluation_metrics(episode, parallel=True))(episodes)
            figures = {name: value[0] for name, value in figures.items()}
        else:
            figures = model.evaluation_metrics(split)
    expected = {
        "accuracy_sum": summed,
        "accuracy_per_token": summed / tokens,
        "accuracy_per_char": summed / characters.double().clamp_min(1),
    }
    for name, values in expected.items():
        chosen = correct.gather(1, values.argmax(1, keepdim=True)).double().mean()
        assert float(figures[name]) == pytest.approx(float(chosen)), name
    assert float(figures["accuracy"]) == float(figures["accuracy_per_char"])
    probability = (torch.softmax(summed, 1) * correct).sum(1).mean()
    assert float(figures["correct_probability"]) == pytest.approx(float(probability), rel=1e-9)
    choices_made = {name: values.argmax(1).tolist() for name, values in expected.items()}
    assert len({tuple(made) for made in choices_made.values()}) > 1  # the rules disagree: the test tells them apart


def test_an_unknown_scoring_rule_is_refused():
    with pytest.raises(
        ValueError,
        match=r"scoring='acc' is not a scoring rule: use one of sum, per_token, per_char, "
        r"calibrated, channel",
    ):
        CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, scoring="acc")


def log_likelihood(model: CausalLMLearner, context: list[int], target: list[int]) -> torch.Tensor:
    """log p(target | context) from one forward of the two (float64), independent of ``option_scores``."""
    ids = torch.tensor([context + target])
    with torch.no_grad():
        log_probs = torch.log_softmax(model.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0], -1)
    return sum(log_probs[len(context) + i - 1, token] for i, token in enumerate(target))


def rows_of(pairs: list[list[tuple[list[int], list[int]] | None]]) -> tuple[torch.Tensor, ...]:
    """(examples, 3, WIDTH) ids, mask and labels of (context, target) rows, labels on the target; None: padding."""
    shape = (len(pairs), 3, WIDTH)
    ids, mask, labels = (
        torch.zeros(shape, dtype=torch.long),
        torch.zeros(shape, dtype=torch.long),
        torch.full(shape, IGNORE_INDEX),
    )
    for row, columns in enumerate(pairs):
        for column, pair in enumerate(columns):
            if pair is not None:
                context, target = pair
                ids[row, column, : len(context) + len(target)] = torch.tensor(context + target)
                mask[row, column, : len(context) + len(target)] = 1
                labels[row, column, len(context) : len(context) + len(target)] = torch.tensor(target)
    return ids, mask, labels


@pytest.mark.parametrize("parallel", [False, True])
def test_calibrated_and_channel_rules_match_an_independent_computation(parallel):
    """``accuracy_calibrated``: log p(option | prompt) - log p(option | content-free prompt) (Holtzman et al.'s
    domain-conditional PMI); ``accuracy_channel``: log p(prompt | option), the option written first (Min et al.'s
    noisy channel); each from one forward per row in float64; ``scoring`` makes either ``accuracy``."""
    from lightning_meta.data.tasks import CALIBRATION_FIELDS, CHANNEL_FIELDS, CORRECT

    free = [[11, 15], [16], [17]]  # each example's template with an empty input
    padded_options = [options + [[]] * (3 - len(options)) for options in OPTIONS]
    calibration = rows_of(
        [[(free[row], option) if option else None for option in options] for row, options in enumerate(padded_options)]
    )
    channel = rows_of(
        [
            [(option[:-1], PROMPTS[row]) if option else None for option in options]
            for row, options in enumerate(padded_options)
        ]
    )
    correct = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])
    ids, mask, labels = choices()
    split = {
        "input_ids": ids[:, 0],
        "attention_mask": mask[:, 0],
        "labels": labels[:, 0],
        CHOICE_INPUT_IDS: ids,
        CHOICE_ATTENTION_MASK: mask,
        CHOICE_LABELS: labels,
        ANSWER: correct.float().argmax(1),
        CORRECT: correct,
        **dict(zip(CALIBRATION_FIELDS, calibration, strict=True)),
        **dict(zip(CHANNEL_FIELDS, channel, strict=True)),
    }
    for scoring in ("calibrated", "channel"):
        torch.manual_seed(5)
        model = CausalLMLearner(
            model_config=MODELS["gpt2"],
            tokenizer=TOKENIZER,
            dtype="float64",
            attn_implementation="eager",
            scoring=scoring,
        ).eval()
        with torch.no_grad():
            if parallel:
                episodes = {name: tensor[None] for name, tensor in split.items()}
                figures = torch.func.vmap(functools.partial(model.evaluation_metrics, parallel=True))(episodes)
                figures = {name: value[0] for name, value in figures.items()}
            else:
                figures = model.evaluation_metrics(split)
        minus_inf = torch.tensor(-torch.inf, dtype=torch.float64)
        expected = {
            "accuracy_sum": [
                [log_likelihood(model, PROMPTS[row], option) if option else minus_inf for option in options]
                for row, options in enumerate(padded_options)
            ],
            "accuracy_calibrated": [
                [
                    log_likelihood(model, PROMPTS[row], option) - log_likelihood(model, free[row], option)
                    if option
                    else minus_inf
                    for option in options
                ]
                for row, options in enumerate(padded_options)
            ],
            "accuracy_channel": [
                [log_likelihood(model, option[:-1], PROMPTS[row]) if option else minus_inf for option in options]
                for row, options in enumerate(padded_options)
            ],
        }
        made = {}
        for name, values in expected.items():
            values = torch.stack([torch.stack(list(row)) for row in values])
            made[name] = tuple(values.argmax(1).tolist())
            chosen = correct.gather(1, values.argmax(1, keepdim=True)).double().mean()
            assert float(figures[name]) == pytest.approx(float(chosen)), (scoring, name)
        assert float(figures["accuracy"]) == float(figures[f"accuracy_{scoring}"])
        assert len(set(made.values())) > 1, made  # the rules choose differently: the test tells them apart


def test_a_rule_without_its_rows_is_refused_in_one_line():
    model = CausalLMLearner(model_config=MODELS["gpt2"], tokenizer=TOKENIZER, scoring="channel").eval()
    ids, mask, labels = choices()
    split = {
        "input_ids": ids[:, 0],
        "attention_mask": mask[:, 0],
        "labels": labels[:, 0],
        CHOICE_INPUT_IDS: ids,
        CHOICE_ATTENTION_MASK: mask,
        CHOICE_LABELS: labels,
        ANSWER: torch.tensor([1, 0, 2]),
    }
    with pytest.raises(
        ValueError,
        match=r"scoring='channel' needs the split's channel_input_ids rows.*"
        r"--data.init_args.channel=true",
    ):
        model.evaluation_metrics(split)
