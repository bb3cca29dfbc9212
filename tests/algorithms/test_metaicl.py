"""MetaICL: the in-context sequence layout, its gradient, the context limit; exact match and option accuracy."""

from __future__ import annotations

import pytest
import torch

from lightning_meta import CausalLMLearner, TaskBatch
from lightning_meta.algorithms import MetaICL, get
from lightning_meta.data.tasks import (
    ANSWER,
    CHOICE_ATTENTION_MASK,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    IGNORE_INDEX,
    Episode,
)

TOKENIZER = "embedded-bpe-512"
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_layer": 1,
    "n_embd": 16,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
WIDTH = 10  # tokens per padded example


def learner(**config) -> CausalLMLearner:
    torch.manual_seed(0)
    return CausalLMLearner(model_config=TINY_GPT2 | config, tokenizer=TOKENIZER, dtype="float64")


def example(prompt: list[int], output: list[int]) -> tuple[list[int], list[int]]:
    return prompt + output, [IGNORE_INDEX] * len(prompt) + output


def split(examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded rows, as TextToTextTasksDataModule makes them."""
    ids = torch.zeros(len(examples), WIDTH, dtype=torch.long)
    labels = torch.full((len(examples), WIDTH), IGNORE_INDEX)
    mask = torch.zeros(len(examples), WIDTH, dtype=torch.long)
    for row, (tokens, targets) in enumerate(examples):
        ids[row, : len(tokens)], labels[row, : len(tokens)], mask[row, : len(tokens)] = (
            torch.tensor(tokens),
            torch.tensor(targets),
            1,
        )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


SUPPORT = [example([11, 12, 13], [21, 2]), example([14, 15], [22, 23, 2]), example([16], [24, 2])]
QUERY = [example([31, 32, 33, 34], [41, 2]), example([35], [42, 43, 2])]


def hand_built(support, query, width):
    """Each query after every demonstration, by list concatenation; labels on the query output only."""
    rows = []
    for tokens, targets in query:
        ids = [t for demo, _ in support for t in demo] + tokens
        labels = [IGNORE_INDEX] * (len(ids) - len(tokens)) + targets
        rows.append((ids + [0] * (width - len(ids)), labels + [IGNORE_INDEX] * (width - len(ids)), len(ids)))
    return {
        "input_ids": torch.tensor([ids for ids, _, _ in rows]),
        "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for _, _, n in rows]),
        "labels": torch.tensor([labels for _, labels, _ in rows]),
    }


#: The longest real concatenation of SUPPORT and QUERY (13 + 6 tokens), rounded up to a multiple of 8.
BUILT = 24


def test_sequence_layout_equals_the_hand_built_one():
    built, dropped = MetaICL().conditioned(learner(), split(SUPPORT), split(QUERY))
    expected = hand_built(SUPPORT, QUERY, width=BUILT)
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(built[name], expected[name]), name
    assert dropped.tolist() == [0, 0]


def test_demonstration_loss_labels_every_kept_demonstrations_output_in_training_only():
    demonstrated = [(tokens, targets) for tokens, targets in SUPPORT]
    expected = hand_built(SUPPORT, QUERY, width=BUILT)
    expected["labels"] = torch.tensor(
        [[t for _, targets in demonstrated for t in targets] + row[13:].tolist() for row in expected["labels"]]
    )
    built, _ = MetaICL().conditioned(learner(), split(SUPPORT), split(QUERY), demonstration_labels=True)
    assert torch.equal(built["labels"], expected["labels"])
    # The demonstration a short context drops carries no label; evaluation's query figures are unchanged.
    built, _ = MetaICL(max_length=14).conditioned(learner(), split(SUPPORT), split(QUERY), demonstration_labels=True)
    assert built["labels"][0, :5].tolist() == SUPPORT[1][1] and built["labels"][0, 5:8].tolist() == SUPPORT[2][1]
    model, episode = learner(), Episode(split(SUPPORT), split(QUERY))
    trained = MetaICL(demonstration_loss=True).meta_loss(model, TaskBatch.stack([episode])).loss
    torch.testing.assert_close(trained, model.loss(expected)[0])
    evaluated = MetaICL(demonstration_loss=True).evaluate(model, episode)
    torch.testing.assert_close(evaluated["loss_post"], MetaICL().evaluate(model, episode)["loss_post"])


def test_demonstrations_that_overflow_the_context_are_dropped_from_the_front_never_the_query():
    # Context 14: query 0 (6 tokens) keeps the last two demonstrations (5 + 3 tokens); query 1 (4) keeps the same.
    built, dropped = MetaICL(max_length=14).conditioned(learner(), split(SUPPORT), split(QUERY))
    assert dropped.tolist() == [1, 1]
    assert torch.equal(built["input_ids"], hand_built(SUPPORT[1:], QUERY, width=14)["input_ids"])
    # Context 12: query 0 fits only the last demonstration; query 1 the last two.
    built, dropped = MetaICL(max_length=12).conditioned(learner(), split(SUPPORT), split(QUERY))
    assert dropped.tolist() == [2, 1]
    assert torch.equal(built["input_ids"][0], hand_built(SUPPORT[2:], QUERY[:1], width=12)["input_ids"][0])
    assert torch.equal(built["labels"][1], hand_built(SUPPORT[1:], QUERY[1:], width=12)["labels"][0])
    with pytest.raises(ValueError, match=r"A query example is 6 tokens long .* context is 5 tokens.*max_length to 5"):
        MetaICL(max_length=5).conditioned(learner(), split(SUPPORT), split(QUERY))
    # The model's own context is the default limit.
    assert MetaICL().context_length(learner(n_positions=12)) == 12
    assert MetaICL(max_length=20).context_length(learner(n_positions=12)) == 12


@pytest.mark.parametrize("packed", [True, False])
def test_gradient_is_the_hand_built_sequence_loss_gradient(packed):
    model = learner()
    other_support = [example([17, 18], [25, 2]), example([19], [26, 27, 2]), example([20, 21, 22], [28, 2])]
    episodes = [Episode(split(SUPPORT), split(QUERY)), Episode(split(other_support), split(QUERY[::-1]))]
    out = MetaICL(encode_demonstrations_once=packed).meta_loss(model, TaskBatch.stack(episodes))
    gradient = torch.autograd.grad(out.loss, list(model.parameters()))
    expected_loss = (
        sum(model.loss(hand_built(s, q, 4 * WIDTH))[0] for s, q in [(SUPPORT, QUERY), (other_support, QUERY[::-1])]) / 2
    )
    expected = torch.autograd.grad(expected_loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, expected_loss)
    for got, want in zip(gradient, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert out.metrics["dropped_demonstrations"] == 0
    if packed:  # one row per episode: 12 demonstration tokens, then each query led by the last one (2 + 6 + 4)
        assert out.metrics["padding_fraction"] == 0
        return
    # Built to the batch's longest concatenation (13 + 6 tokens, rounded up to 24), not 4 examples' width.
    real = sum(len(tokens) for s, q in [(SUPPORT, QUERY), (other_support, QUERY[::-1])] for tokens, _ in q) + 4 * 13
    assert out.metrics["padding_fraction"] == pytest.approx(1 - real / (2 * 2 * BUILT))


def test_evaluation_is_zero_shot_before_and_in_context_after():
    model = learner()
    episode = Episode(split(SUPPORT), split(QUERY))
    figures = get("metaicl").evaluate(model, episode)
    assert figures["loss_pre"] == model.evaluation_metrics(split(QUERY))["loss"]
    at_max_length = model.evaluation_metrics(hand_built(SUPPORT, QUERY, 4 * WIDTH))["loss"]
    torch.testing.assert_close(figures["loss_post"], at_max_length, rtol=1e-12, atol=0)
    assert set(figures) == {f"{name}_{when}" for name in ("loss", "exact_match") for when in ("pre", "post")}


def test_refuses_a_learner_that_is_not_a_language_model(mlp_learner):
    with pytest.raises(ValueError, match="MetaICL conditions a causal LM on demonstrations; RegressionLearner"):
        MetaICL().check_learner(mlp_learner)


def test_running_text_without_output_labels_is_refused_naming_the_datamodule():
    # LanguageModelingTasksDataModule's blocks: ids and mask only (a KeyError: 'labels' deep inside before).
    blocks = {key: value.unsqueeze(0) for key, value in split(SUPPORT).items() if key != "labels"}
    batch = TaskBatch(support=blocks, query=blocks, shots=3)
    with pytest.raises(ValueError, match=r"the batch's support has no 'labels' .*Use TextToTextTasksDataModule"):
        MetaICL().meta_loss(learner(), batch)


def greedy_exact(model: CausalLMLearner, prompt: list[int], output: list[int]) -> bool:
    """Greedy decoding, one token at a time: does it write ``output``?"""
    tokens = list(prompt)
    for _ in output:
        logits = model.predict({"input_ids": torch.tensor([tokens]), "attention_mask": torch.ones(1, len(tokens))})
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :] == output


def test_exact_match_equals_greedy_decoding():
    model = learner()
    # Outputs the model's own greedy continuation (exact) and a perturbed one (not exact).
    rows = []
    for prompt in ([11, 12, 13], [14, 15], [16, 17, 18, 19]):
        greedy = list(prompt)
        for _ in range(3):
            logits = model.predict({"input_ids": torch.tensor([greedy]), "attention_mask": torch.ones(1, len(greedy))})
            greedy.append(int(logits[0, -1].argmax()))
        rows += [(prompt, greedy[len(prompt) :]), (prompt, greedy[len(prompt) :][:2] + [(greedy[-1] + 1) % 512])]
    expected = [greedy_exact(model, prompt, output) for prompt, output in rows]
    figures = model.evaluation_metrics(split([example(prompt, output) for prompt, output in rows]))
    assert expected == [True, False] * 3
    assert figures["exact_match"] == pytest.approx(sum(expected) / len(expected))


def test_option_accuracy_is_rank_classification_by_summed_log_probability():
    model = learner()
    prompts, options = [[11, 12], [13, 14, 15], [16]], [[21, 2], [22, 23, 2], [24, 2]]
    answers = [0, 1, 2]

    def log_likelihood(prompt, option):
        ids = torch.tensor([prompt + option])
        with torch.no_grad():
            log_probs = torch.log_softmax(model.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), -1)
        return sum(float(log_probs[0, len(prompt) + i - 1, token]) for i, token in enumerate(option))

    chosen = [max(range(3), key=lambda k, p=prompt: log_likelihood(p, options[k])) for prompt in prompts]
    query = split([example(prompt, options[answer]) for prompt, answer in zip(prompts, answers, strict=True)])
    choices = [split([example(prompt, option) for option in options]) for prompt in prompts]
    query |= {
        CHOICE_INPUT_IDS: torch.stack([c["input_ids"] for c in choices]),
        CHOICE_ATTENTION_MASK: torch.stack([c["attention_mask"] for c in choices]),
        CHOICE_LABELS: torch.stack([c["labels"] for c in choices]),
        ANSWER: torch.tensor(answers),
    }
    figures = model.evaluation_metrics(query)
    assert figures["accuracy"] == pytest.approx(sum(c == a for c, a in zip(chosen, answers, strict=True)) / 3)
    # An example without options (answer -1) counts its exact match instead.
    query[ANSWER] = torch.tensor([-1, -1, -1])
    assert model.evaluation_metrics(query)["accuracy"] == model.evaluation_metrics(query)["exact_match"]
    # Options are scored in context under MetaICL: same figures as scoring the hand-built sequences.
    conditioned, _ = MetaICL().conditioned(model, split(SUPPORT), query)
    assert conditioned[CHOICE_INPUT_IDS].shape == (3, 3, BUILT)  # 13 + 6 tokens at most
    demo = [t for tokens, _ in SUPPORT for t in tokens]
    ids = conditioned[CHOICE_INPUT_IDS][1, 2]
    assert ids[: len(demo) + 4].tolist() == demo + prompts[1] + [24]


def channel_split(direct, channel):
    """``split(direct)`` with ``channel`` as its channel sequences (output, separator, then input; labels on the
    input), as ``TextToTextTasksDataModule(channel=True)`` writes them."""
    from lightning_meta.data.tasks import CHANNEL_SEQUENCE_FIELDS

    rows = split(channel)
    return split(direct) | dict(zip(CHANNEL_SEQUENCE_FIELDS, (rows[name] for name in rows), strict=True))


# Channel sequences of SUPPORT and QUERY: the output (without its end token), separator 9, the prompt and the end token.
CHANNEL_SUPPORT = [example([21, 9], [11, 12, 13, 2]), example([22, 23, 9], [14, 15, 2]), example([24, 9], [16, 2])]
CHANNEL_QUERY = [example([41, 9], [31, 32, 33, 34, 2]), example([42, 43, 9], [35, 2])]


def test_channel_metaicl_loss_is_the_query_inputs_cross_entropy_after_channel_demonstrations():
    """Channel MetaICL (Min et al. 2022): demonstrations written output-then-input, the loss on the query's input
    tokens given its output, against the hand-built sequences' cross-entropy computed here (float64)."""
    model = learner()
    episode = Episode(channel_split(SUPPORT, CHANNEL_SUPPORT), channel_split(QUERY, CHANNEL_QUERY))
    loss = MetaICL(direction="channel").meta_loss(model, TaskBatch.stack([episode])).loss
    demo = [t for tokens, _ in CHANNEL_SUPPORT for t in tokens]
    terms = []
    for tokens, targets in CHANNEL_QUERY:
        ids = torch.tensor([demo + tokens])
        with torch.no_grad():
            log_probs = torch.log_softmax(
                model.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0], -1
            )
        terms += [-log_probs[len(demo) + i - 1, t] for i, t in enumerate(targets) if t != IGNORE_INDEX]
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean(), rtol=1e-12, atol=1e-12)
    direct = MetaICL().meta_loss(model, TaskBatch.stack([episode])).loss
    assert not torch.isclose(loss, direct)  # the direction changes the loss
    with pytest.raises(ValueError, match=r"needs the channel sequences .* --data.init_args.channel=true"):
        MetaICL(direction="channel").meta_loss(model, TaskBatch.stack([Episode(split(SUPPORT), split(QUERY))]))
    with pytest.raises(ValueError, match=r"direction='backwards' is not a direction"):
        MetaICL(direction="backwards")


def test_calibration_rows_get_the_options_demonstrations_and_channel_rows_the_channel_ones():
    """Under MetaICL the content-free prompt is read after the same demonstrations as the options (those that fit
    beside the longest option, though a calibration row is shorter); the channel option rows (option, separator,
    prompt) after the support's channel sequences."""
    from lightning_meta.data.tasks import CALIBRATION_FIELDS, CHANNEL_FIELDS

    prompt, options, free = [31, 32, 33, 34], [[41], [42, 43]], [31]
    rows = {
        CHOICE_INPUT_IDS: split([example(prompt, option) for option in options]),
        CALIBRATION_FIELDS[0]: split([example(free, option) for option in options]),
        CHANNEL_FIELDS[0]: split([example(option + [9], prompt) for option in options]),
    }
    fields = {
        CHOICE_INPUT_IDS: (CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS),
        CALIBRATION_FIELDS[0]: CALIBRATION_FIELDS,
        CHANNEL_FIELDS[0]: CHANNEL_FIELDS,
    }
    query = channel_split(QUERY[:1], CHANNEL_QUERY[:1]) | {ANSWER: torch.tensor([0])}
    for first, names in fields.items():
        query |= {
            name: rows[first][key][None]
            for name, key in zip(names, ("input_ids", "attention_mask", "labels"), strict=True)
        }
    # Context 14: beside the longest option (6 tokens) the last two demonstrations fit (5 + 3); beside a calibration
    # row alone (3 tokens) all three would.
    built, _ = MetaICL(max_length=14).conditioned(learner(), channel_split(SUPPORT, CHANNEL_SUPPORT), query)
    demo = [t for tokens, _ in SUPPORT[1:] for t in tokens]
    for column, option in enumerate(options):
        calibration = built[CALIBRATION_FIELDS[0]][0, column][built[CALIBRATION_FIELDS[1]][0, column].bool()]
        assert calibration.tolist() == demo + free + option
        labels = built[CALIBRATION_FIELDS[2]][0, column]
        assert labels[labels != IGNORE_INDEX].tolist() == option
    # Beside the longest channel row (7 tokens) only the last channel sequence (4 tokens) fits; 6 + 4 + 7 would not.
    for column, option in enumerate(options):
        channel = built[CHANNEL_FIELDS[0]][0, column][built[CHANNEL_FIELDS[1]][0, column].bool()]
        assert channel.tolist() == CHANNEL_SUPPORT[2][0] + option + [9] + prompt
        labels = built[CHANNEL_FIELDS[2]][0, column]
        assert labels[labels != IGNORE_INDEX].tolist() == prompt


# Encoding the demonstrations once (issue 28): packed training rows and evaluation from their cached keys and values.
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}
OTHER_SUPPORT = [example([17, 18], [25, 2]), example([19], [26, 27, 2]), example([20, 21, 22], [28, 2])]
OTHER_CHANNEL_SUPPORT = [
    example([25, 9], [17, 18, 2]),
    example([26, 27, 9], [19, 2]),
    example([28, 9], [20, 21, 22, 2]),
]
# A third query whose first token carries the loss (an empty prompt): the last demonstration token predicts it.
QUERIES = QUERY + [example([], [44, 45, 2])]
CHANNEL_QUERIES = CHANNEL_QUERY + [example([], [36, 2])]


def tolerance(kind: str) -> dict[str, float]:
    """Float64 agreement: GPT-2 to rounding; Llama computes RMSNorm, RoPE and eager attention's softmax in float32
    even in a float64 model, so a row's figures move by float32 rounding when the row holds other keys."""
    return {"rtol": 1e-10, "atol": 1e-12} if kind.startswith("gpt2") else {"rtol": 1e-5, "atol": 1e-8}


def tiny(kind: str) -> CausalLMLearner:
    """A float64 tiny model, ``"<model type>-<attention>"``."""
    model_type, attention = kind.split("-")
    torch.manual_seed(0)
    config = TINY_GPT2 if model_type == "gpt2" else TINY_LLAMA
    return CausalLMLearner(model_config=config, tokenizer=TOKENIZER, dtype="float64", attn_implementation=attention)


def two_episodes() -> TaskBatch:
    return TaskBatch.stack(
        [
            Episode(channel_split(SUPPORT, CHANNEL_SUPPORT), channel_split(QUERIES, CHANNEL_QUERIES)),
            Episode(
                channel_split(OTHER_SUPPORT, OTHER_CHANNEL_SUPPORT), channel_split(QUERIES[::-1], CHANNEL_QUERIES[::-1])
            ),
        ]
    )


@pytest.mark.parametrize("kind", ["gpt2-eager", "gpt2-sdpa", "llama-eager", "llama-sdpa"])
@pytest.mark.parametrize("direction", ["direct", "channel"])
@pytest.mark.parametrize("demonstration_loss", [False, True])
def test_packed_rows_equal_one_sequence_per_query_in_loss_and_gradient(kind, direction, demonstration_loss):
    """One row per episode (demonstrations once, each query after them under a block mask) gives the loss and
    meta-gradient of one sequence per query, in float64; under demonstration_loss a demonstration's label still
    counts once per query, as in the separate sequences."""
    model, batch = tiny(kind), two_episodes()
    packed = MetaICL(direction=direction, demonstration_loss=demonstration_loss)
    separate = MetaICL(direction=direction, demonstration_loss=demonstration_loss, encode_demonstrations_once=False)
    rows = packed.packed_queries(model, packed.loss_rows(batch.support), packed.loss_rows(batch.query))
    assert rows is not None and rows["input_ids"].shape[:2] == (2, 1)  # one row per episode
    parameters = [p for p in model.parameters() if p.requires_grad]
    results = []
    for algorithm in (packed, separate):
        out = algorithm.meta_loss(model, batch)
        results.append((out.loss.detach(), torch.autograd.grad(out.loss, parameters)))
    (loss, gradient), (expected_loss, expected) = results
    torch.testing.assert_close(loss, expected_loss, **tolerance(kind))
    for got, want in zip(gradient, expected, strict=True):
        torch.testing.assert_close(got, want, **tolerance(kind))


def test_packing_falls_back_where_a_query_would_drop_a_demonstration_or_the_model_takes_no_block_mask():
    model, batch = tiny("gpt2-eager"), two_episodes()
    short = MetaICL(max_length=14)  # beside a 6-token query only the last two demonstrations fit
    assert short.packed_queries(model, batch.support, batch.query) is None
    separate = MetaICL(max_length=14, encode_demonstrations_once=False)
    torch.testing.assert_close(short.meta_loss(model, batch).loss, separate.meta_loss(model, batch).loss)
    torch.manual_seed(0)
    neox = CausalLMLearner(
        model_config={
            "model_type": "gpt_neox",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
        },
        tokenizer=TOKENIZER,
    )
    assert (
        MetaICL().packing_refusal(neox) == "'gpt_neox' models are not tested with a block (4D) attention mask "
        "(tested: gpt2, llama)"
    )
    assert MetaICL().packed_queries(neox, batch.support, batch.query) is None


def scored_query() -> dict[str, torch.Tensor]:
    """QUERY's two examples with three options each, their calibration rows and channel rows."""
    from lightning_meta.data.tasks import CALIBRATION_FIELDS, CHANNEL_FIELDS

    prompts, options, free = [[31, 32, 33, 34], [35]], [[41, 2], [42, 43, 2], [44, 2]], [31]
    kinds = {
        (CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS): lambda prompt, option: example(prompt, option),
        CALIBRATION_FIELDS: lambda prompt, option: example(free, option),
        CHANNEL_FIELDS: lambda prompt, option: example(option[:-1] + [9], prompt + [2]),
    }
    query = channel_split(QUERY, CHANNEL_QUERY) | {ANSWER: torch.tensor([0, 2])}
    for names, row in kinds.items():
        rows = [split([row(prompt, option) for option in options]) for prompt in prompts]
        query |= {
            name: torch.stack([r[key] for r in rows])
            for name, key in zip(names, ("input_ids", "attention_mask", "labels"), strict=True)
        }
    return query


@pytest.mark.parametrize("kind", ["gpt2-sdpa", "llama-eager"])
@pytest.mark.parametrize("direction", ["direct", "channel"])
def test_evaluation_from_the_demonstrations_keys_and_values_equals_the_sequences_written_out(kind, direction):
    """Evaluation runs the demonstrations once and continues every query, option, calibration and channel row from
    their cached keys and values: every figure and every option score equal the written-out sequences' (float64)."""
    from lightning_meta.data.tasks import CALIBRATION_FIELDS, CHANNEL_FIELDS

    model = tiny(kind)
    support, query = channel_split(SUPPORT, CHANNEL_SUPPORT), scored_query()
    fast, plain = MetaICL(direction=direction), MetaICL(direction=direction, encode_demonstrations_once=False)
    got, want = (algorithm.evaluate(model, Episode(support, query)) for algorithm in (fast, plain))
    assert set(got) == set(want) and {"accuracy_calibrated_post", "correct_probability_post"} <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tolerance(kind), msg=name)
    built, prefixes = fast.after_demonstrations(model, support, query)
    written, _ = plain.conditioned(model, support, query)
    for fields in ((CHOICE_INPUT_IDS, CHOICE_ATTENTION_MASK, CHOICE_LABELS), CALIBRATION_FIELDS, CHANNEL_FIELDS):
        with torch.no_grad():
            expected, expected_greedy = model.option_scores(*(written[name] for name in fields))
            for parallel in (False, True):
                scores, greedy = model.option_scores(
                    *(built[name] for name in fields), parallel=parallel, prefix=prefixes[fields[1]]
                )
                torch.testing.assert_close(scores, expected, **tolerance(kind))
                assert torch.equal(greedy, expected_greedy)
    # A demonstration the context cannot hold beside some row: the sequences are written out, as before.
    assert MetaICL(max_length=14).after_demonstrations(model, support, query) is None


def test_bigbench_demonstrations_are_written_in_bigbench_k_shot_layout(tmp_path, monkeypatch):
    """``TextToTextTasksDataModule(demonstrations="bigbench")``: MetaICL's evaluation writes each row as BIG-bench's
    ``json_task.py`` writes a K-shot prompt: ``task_prefix`` once, then each shot as ``default_format_fn`` formats it
    (``example_input_prefix + input + example_output_prefix``) followed by its target, the shots and the query joined
    by ``few_shot_example_separator`` (``make_nshot_dataset``), the option right after the output prefix (no space
    after one ending in whitespace). The zero-shot rows are ``task_prefix + formatted query + option``."""
    import json

    from lightning_meta.data.tasks import CALIBRATION_FIELDS
    from lightning_meta.data.tokenization import load_tokenizer
    from lightning_meta.datamodules import TextToTextTasksDataModule

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
    layouts = {  # task.json fields: one task with its own prefixes (the output prefix ends in a newline), one with
        # BIG-bench's defaults ("\nQ: ", "\nA: ", "\n" between shots) and a task prefix
        "own": {
            "task_prefix": "Decide.\n",
            "example_input_prefix": "Question: ",
            "example_output_prefix": "\nAns:\n",
            "few_shot_example_separator": "\n\n",
        },
        "plain": {"task_prefix": "Pick one."},
        "tested": {},  # the test split's
    }
    for name, fields in layouts.items():
        examples = [
            {"input": f"is {words[i % 8]} {i} odd", "target_scores": {"no": 1 - i % 2, "yes": i % 2}} for i in range(8)
        ]
        folder = tmp_path / "bigbench" / name
        folder.mkdir(parents=True)
        (folder / "task.json").write_text(
            json.dumps(
                {"keywords": ["logical reasoning"], "examples": examples, "append_choices_to_input": False, **fields}
            )
        )
    (tmp_path / "bigbench" / "train").mkdir()  # a training task, which the split needs
    (tmp_path / "bigbench" / "train" / "task.json").write_text(
        json.dumps({"examples": [{"input": f"copy {word}", "target": word} for word in words]})
    )
    module = TextToTextTasksDataModule(
        tokenizer=TOKENIZER,
        dataset=str(tmp_path / "bigbench"),
        shots=2,
        queries=2,
        max_length=48,
        val_tasks=["own", "plain"],
        test_tasks=["tested"],
        num_val_tasks=4,
        demonstrations="bigbench",
    )
    module.setup("fit")
    model = CausalLMLearner(
        model_config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 256},
        tokenizer=TOKENIZER,
    )
    decode = load_tokenizer(TOKENIZER).decode
    checked = set()
    for batch in module.eval_batches("val"):
        for episode in batch.episodes():
            name = episode.metadata["task"]
            task, fields = (
                module.examples[name],
                {"example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ", "few_shot_example_separator": "\n"}
                | layouts[name],
            )

            def formatted(text: str, fields=fields) -> str:  # json_task.py's default_format_fn
                return fields["example_input_prefix"] + text + fields["example_output_prefix"]

            rows = episode.metadata["example_ids"].tolist()
            shots = [formatted(task["inputs"][row]) + task["outputs"][row][0] for row in rows[:2]]
            context = fields["task_prefix"] + fields["few_shot_example_separator"].join(shots)
            built, _ = MetaICL(encode_demonstrations_once=False).conditioned(model, episode.support, episode.query)
            for position, row in enumerate(rows[2:]):
                for option, text in enumerate(task["options"][row]):
                    ids, mask = (
                        tensor[position, option] for tensor in (built[CHOICE_INPUT_IDS], built[CHOICE_ATTENTION_MASK])
                    )
                    k_shot = context + fields["few_shot_example_separator"] + formatted(task["inputs"][row]) + text
                    assert decode(ids[mask.bool()].tolist()) == k_shot
                    zero = (
                        episode.query[CHOICE_INPUT_IDS][position, option],
                        episode.query[CHOICE_ATTENTION_MASK][position, option],
                    )
                    assert (
                        decode(zero[0][zero[1].bool()].tolist())
                        == fields["task_prefix"] + formatted(task["inputs"][row]) + text
                    )
                    ids, mask = (built[field][position, option] for field in CALIBRATION_FIELDS[:2])
                    assert decode(ids[mask.bool()].tolist()) == (
                        context + fields["few_shot_example_separator"] + formatted("") + text
                    )
                checked.add(name)
    assert checked == {"own", "plain"}
    # One written out by hand: examples 0 and 1 of "plain" as the shots, example 2 as the query, its option "no".
    from lightning_meta.datamodules.text_encoding import example_rows as _rows

    task = module.tasks["plain"]
    support, query = (_rows(task, torch.tensor(rows), 2, demonstrations=True) for rows in ([0, 1], [2]))
    built, _ = MetaICL(encode_demonstrations_once=False).conditioned(model, support, query)
    ids, mask = built[CHOICE_INPUT_IDS][0, 0], built[CHOICE_ATTENTION_MASK][0, 0]
    assert decode(ids[mask.bool()].tolist()) == (
        "Pick one.\nQ: is red 0 odd\nA: no\n\nQ: is blue 1 odd\nA: yes\n\nQ: is green 2 odd\nA: no"
    )
    assert MetaICL().after_demonstrations(model, support, query) is None  # the cached prefix would misplace it
