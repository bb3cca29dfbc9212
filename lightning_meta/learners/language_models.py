"""Causal language models as learners: any Hugging Face ``AutoModelForCausalLM``.

The model is built from a config (random init, for tests and the quick start) or loaded from a local folder
(:mod:`~lightning_meta.learners.transformer_models`); nothing is downloaded. Fast weights can be all weights, the
last transformer blocks, biases and norms, name globs, or LoRA adapters (via ``peft``): then the inner loop adapts
only the adapters and the outer loop meta-learns their initialization (and, with ``meta_learn_base``, the base
weights too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import Cache, DynamicCache, PreTrainedModel

from lightning_meta._compat import attention_implementation, under_function_transform
from lightning_meta.data.tasks import (
    CALIBRATION_FIELDS,
    CHANNEL_FIELDS,
    CHOICE_ATTENTION_MASK,
    CHOICE_INPUT_IDS,
    CHOICE_LABELS,
    IGNORE_INDEX,
    LABEL_WEIGHTS,
    POSITION_IDS,
    SEGMENT_IDS,
    Choices,
    GenerationRule,
    Split,
)
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.learners.base import DataCheck, Learner
from lightning_meta.learners.transformer_models import (
    DTYPES,
    LoraSettings,
    add_lora,
    build_model,
    enable_functional_checkpointing,
)

#: The rules that choose an option, by name (:meth:`CausalLMLearner.evaluation_metrics`): its summed
#: log-probability (BIG-bench's grade, lm-eval's ``acc``), per token, per character (lm-eval's ``acc_norm``),
#: calibrated (minus its log-probability after the content-free prompt: domain-conditional PMI, Holtzman et al.
#: 2021) and channel (log p(input | option), the option written first: the noisy channel, Min et al. 2022).
SCORING_RULES = ("sum", "per_token", "per_char", "calibrated", "channel")
#: The split fields each rule needs beside the choice rows, and the datamodule setting that provides them.
_RULE_ROWS = {
    "calibrated": (CALIBRATION_FIELDS, "evaluation splits with options and --data.init_args.calibration=true"),
    "channel": (CHANNEL_FIELDS, "--data.init_args.channel=true"),
}
#: Tokens decoded past an example's longest correct output before its generated output is cut and compared
#: (:meth:`CausalLMLearner.evaluation_metrics` with a ``generation`` rule): room for the stop string and for text
#: around a regular expression's match.
GENERATED_TOKENS_PAST_TARGET = 16
#: Model types tested to run a packed split's block mask exactly (transformers takes a 4D mask as it is; a model
#: that derives more from the 2D mask, ALiBi's positions or a sliding window, would not see the blocks).
BLOCK_MASK_MODEL_TYPES = ("gpt2", "llama")


@dataclass(frozen=True)
class Prefix:
    """Tokens that every row of a split continues from (MetaICL's demonstrations), run once: their cached keys and
    values (one row) and their count. Made by :meth:`CausalLMLearner.encode_prefix`."""

    cache: Cache
    length: int

    def continued(self, attention_mask: Tensor) -> dict[str, Any]:
        """The model's extra inputs for rows (``attention_mask`` ``(rows, tokens)``, real tokens first) that continue
        after the prefix: a copy of its cache for every row (a forward appends to the cache it is given), the mask
        with the prefix's tokens in front, and positions counted on from the prefix."""
        rows = attention_mask.shape[0]
        cache = DynamicCache(
            [(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values, *_ in self.cache]
        )
        seen = attention_mask.new_ones(attention_mask.shape[0], self.length)
        positions = self.length + (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        return {"cache": cache, "attention_mask": torch.cat([seen, attention_mask], 1), "position_ids": positions}


class CausalLMLearner(Learner):
    """Next-token cross-entropy of a causal LM on ``input_ids`` (padding and ``-100`` labels ignored).

    Args:
        pretrained: a local ``save_pretrained`` folder, ``pkg:NAME[/sub/dir]`` for an installed
            data package holding one, or a hub id in the local Hugging Face cache; ``None`` builds
            the model from ``model_config``.
        model_config: a Hugging Face config as a dict with ``model_type``
            (``{"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4}``); the vocabulary
            size and special-token ids come from ``tokenizer`` unless given.
        tokenizer: the tokenizer the data uses (``embedded-bpe-4096`` or a local folder).
        gguf_file: a GGUF file inside ``pretrained``; dequantized once and cached as safetensors.
        fast_weights: see :class:`Learner`; default ``"lora"`` with ``lora``, else ``"all"``.
        lora: add LoRA adapters (``LoraSettings``).
        meta_learn_base: with ``lora``, also meta-learn the base weights in the outer loop
            (the inner loop still adapts only the adapters).
        attn_implementation: ``"eager"``, ``"sdpa"``, ...; second-order MAML switches to eager.
        gradient_checkpointing: non-reentrant activation checkpointing in the transformer.
        dtype: parameter dtype.
        trust_remote_code: let ``pretrained`` run its own model code (``auto_map`` in its config.json);
            off by default, and never asked on stdin.
        scoring: the rule whose choice of option is reported as ``accuracy`` (:data:`SCORING_RULES`); every
            rule is also reported as ``accuracy_<rule>`` (``calibrated`` and ``channel`` where the split carries
            their rows: :data:`~lightning_meta.data.tasks.CALIBRATION_FIELDS`, ``CHANNEL_FIELDS``).
    """

    task_type = "language_modeling"
    metric_names = (
        "loss",
        "exact_match",
        "accuracy",
        *(f"accuracy_{rule}" for rule in SCORING_RULES),
        "correct_probability",
    )

    def __init__(
        self,
        pretrained: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str = "embedded-bpe-4096",
        gguf_file: str | None = None,
        fast_weights: str | list[str] | None = None,
        lora: LoraSettings | None = None,
        meta_learn_base: bool = False,
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float64"] = "float32",
        trust_remote_code: bool = False,
        scoring: Literal["sum", "per_token", "per_char", "calibrated", "channel"] = "sum",
    ) -> None:
        if scoring not in SCORING_RULES:
            raise ValueError(
                f"scoring={scoring!r} is not a scoring rule: use one of {', '.join(SCORING_RULES)} "
                "(--model.learner.init_args.scoring)."
            )
        if (pretrained is None) == (model_config is None):
            raise ValueError(
                "Give exactly one of pretrained (a local folder) or model_config (a dict with model_type)."
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
        model = build_model(
            pretrained,
            model_config,
            tokenizer,
            gguf_file,
            attn_implementation,
            DTYPES[dtype],
            trust_remote_code=trust_remote_code,
        )
        if lora is not None:
            model = add_lora(model, lora, meta_learn_base)
        elif meta_learn_base:
            raise ValueError(
                "meta_learn_base=True only applies with lora=...; without LoRA all weights are meta-learned."
            )
        if gradient_checkpointing:  # after LoRA: each block records its weights as peft renamed them
            enable_functional_checkpointing(model.get_base_model() if lora is not None else model)
        super().__init__(
            model,
            fast_weights=fast_weights if fast_weights is not None else ("lora" if lora is not None else "all"),
            input_key="input_ids",
            target_key="labels",
        )
        self.pretrained = pretrained
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.gguf_file = gguf_file
        self.fast_weights = fast_weights
        self.lora = lora
        self.meta_learn_base = meta_learn_base
        self.attn_implementation = attn_implementation
        self.gradient_checkpointing = gradient_checkpointing
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.scoring = scoring

    @property
    def dtype(self) -> str:  # the constructor argument, for configs and checkpoints
        return self.dtype_name

    def rebuilt_weights(self) -> list[str]:
        """The frozen weights (the base under LoRA) of a model loaded from ``pretrained``: loading it again
        restores them, so checkpoints hold only the trained weights. A model built from ``model_config`` has
        a random base, which checkpoints keep."""
        if self.pretrained is None:
            return []
        return [name for name, weight in self.named_parameters(remove_duplicate=False) if not weight.requires_grad]

    @property
    def transformer(self) -> PreTrainedModel:
        """The Hugging Face model (under the peft wrapper when LoRA is on)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def max_positions(self) -> int | None:
        """The model's ``max_position_embeddings`` (GPT-2: ``n_positions``)."""
        return getattr(self.transformer.config, "max_position_embeddings", None)

    def predict(self, split: Split, params: Mapping[str, Tensor] | None = None, prefix: Prefix | None = None) -> Tensor:
        """Logits ``(sequences, tokens, vocabulary)``; with ``prefix``, of rows that continue after it."""
        return self(**self._inputs_after(split, prefix), params=params).logits

    def _inputs_after(self, split: Split, prefix: Prefix | None) -> dict[str, Any]:
        """:meth:`model_inputs`, continuing after ``prefix`` where given."""
        inputs = self.model_inputs(split)
        return inputs if prefix is None else inputs | prefix.continued(inputs["attention_mask"])

    def model_inputs(self, split: Split) -> dict[str, Tensor | None]:
        """The model's inputs for ``split``: its tokens and padding mask; for a packed split (:data:`SEGMENT_IDS`:
        several sequences in one row, sharing their first tokens) each token's position in its own sequence and a
        block mask in place of the padding mask: a token attends to the earlier tokens of its own segment and of
        segment 0 (the shared tokens), never to another segment's, so each segment's outputs are its sequence's
        run alone (:meth:`block_mask_refusal` says where the model cannot take it)."""
        inputs = {"input_ids": split["input_ids"], "attention_mask": split.get("attention_mask")}
        if SEGMENT_IDS not in split:
            return inputs
        segments = split[SEGMENT_IDS]
        order = torch.arange(segments.shape[-1], device=segments.device)
        key, query = segments[..., None, :], segments[..., :, None]
        allowed = (order[:, None] >= order[None, :]) & (key >= 0) & ((key == 0) | (key == query))
        # A padding row attends to itself: no row without keys (a softmax over nothing is NaN).
        allowed = (allowed | (order[:, None] == order[None, :]))[..., None, :, :]
        if attention_implementation(self.transformer) != "sdpa":  # eager adds the mask to the scores
            dtype = self.transformer.dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return inputs | {"attention_mask": allowed, "position_ids": split[POSITION_IDS]}

    def block_mask_refusal(self) -> str | None:
        """Why this model cannot run a packed split's block mask (:meth:`model_inputs`) exactly, or ``None``."""
        model_type = self.transformer.config.model_type
        if model_type not in BLOCK_MASK_MODEL_TYPES:
            return (
                f"{model_type!r} models are not tested with a block (4D) attention mask "
                f"(tested: {', '.join(BLOCK_MASK_MODEL_TYPES)})"
            )
        if (implementation := attention_implementation(self.transformer)) not in ("eager", "sdpa"):
            return f"{implementation!r} attention takes no block (4D) attention mask (eager and sdpa do)"
        return None

    def encode_prefix(self, input_ids: Tensor, params: Mapping[str, Tensor] | None = None) -> Prefix:
        """Run ``input_ids`` ``(tokens,)``, every one real, once: a :class:`Prefix` for rows that continue after
        them (:meth:`evaluation_metrics`' ``prefixes``), without gradients (it serves scoring)."""
        ids = input_ids[None]
        with torch.no_grad():
            cache = self(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, params=params
            ).cache
        return Prefix(cache, ids.shape[1])

    def data_checks(self, split_name: str, split: Split) -> list[DataCheck]:
        """Token ids and labels (of the options too) inside the model's vocabulary (labels may be -100: ignored)."""
        vocab_size = self.transformer.config.vocab_size
        fix = f"use the same tokenizer for the data and the model (learner: {self.tokenizer!r})"
        checks = super().data_checks(split_name, split)
        for name in ("input_ids", CHOICE_INPUT_IDS):
            if name in split:
                ids = split[name].flatten(1)
                checks.append(
                    DataCheck(
                        ((ids >= 0) & (ids < vocab_size)).all(1),
                        f"{split_name}[{name!r}] has token ids outside the model's vocabulary of {vocab_size}: the "
                        "data's tokenizer differs from the model's",
                        fix,
                    )
                )
        for name in ("labels", CHOICE_LABELS):
            if name in split:
                labels = split[name].flatten(1)
                checks.append(
                    DataCheck(
                        (((labels >= 0) & (labels < vocab_size)) | (labels == IGNORE_INDEX)).all(1),
                        f"{split_name}[{name!r}] has labels that are neither token ids of the vocabulary of "
                        f"{vocab_size} nor {IGNORE_INDEX} (ignored)",
                        fix,
                    )
                )
        return checks

    def loss(self, split: Split, params: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        read = self.read_logits(self.model_inputs(split), _labels(split)[:, 1:], params)
        weights = split.get(LABEL_WEIGHTS)
        loss = F.cross_entropy(
            read.logits, read.targets, ignore_index=IGNORE_INDEX, reduction="mean" if weights is None else "none"
        )
        if weights is not None:  # a packed split: a label its sequences share counts once per sequence
            weights = read.at(weights[:, 1:]) * (read.targets != IGNORE_INDEX)
            loss = (loss * weights).sum() / weights.sum()
        return loss, {"loss": loss.detach()}

    def read_logits(
        self, inputs: Mapping[str, Any], targets: Tensor, params: Mapping[str, Tensor] | None = None
    ) -> ReadLogits:
        """The float32 logits of the positions whose next token is read (``targets[:, t]``, the token after
        position ``t``, is not ``-100``), with those targets (:class:`ReadLogits`); ``inputs``: the model's.

        The hidden states are gathered at those positions before the output embeddings, so the LM head
        (SmolLM2: a fifth of a forward's FLOPs) and the float32 log-softmax run only where a loss or a score
        reads them (MetaICL and MultiTask: the outputs; option scoring: the options): the same metrics and
        gradients as full logits read there. One host sync (the positions' count). Under a ``torch.func``
        transform (``vmap``), where shapes cannot depend on the data, every position runs.
        """
        if under_function_transform(inputs["input_ids"]):
            logits = self(**inputs, params=params).logits[:, : targets.shape[1]]
            return ReadLogits(_float32(logits).flatten(0, 1), targets.flatten(), None, None)
        rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
        with _head_reads(self.transformer.get_output_embeddings(), rows, positions):
            logits = self(**inputs, params=params).logits[0]
        return ReadLogits(_float32(logits), targets[rows, positions], rows, positions)

    def evaluation_metrics(
        self,
        split: Split,
        params: Mapping[str, Tensor] | None = None,
        *,
        parallel: bool = False,
        prefixes: Mapping[str, Prefix] | None = None,
        generation: GenerationRule | None = None,
    ) -> dict[str, Tensor]:
        """The loss; with ``labels`` (supervised outputs) also ``exact_match``, and ``accuracy``.

        ``exact_match``: the share of sequences whose every labelled token is the model's most
        likely next token, i.e. greedy decoding reproduces the output (and its end token).
        ``accuracy``: where the split lists options (:class:`Choices`), the mean grade of the
        option the ``scoring`` rule chooses (its :attr:`Choices.credit`, BIG-bench's ``multiple_choice_grade``;
        without it 1 when the option is among the :attr:`Choices.correct` rows, else 0); for examples without
        options (:attr:`Choices.multiple_choice` false) their exact match. Every rule is reported as
        ``accuracy_<rule>``:
        ``accuracy_sum`` (the option's summed log-probability of its own tokens, no end token:
        BIG-bench's rank classification, lm-eval's ``acc``), ``accuracy_per_token`` (divided by its token
        count: the sum favours short options), ``accuracy_per_char`` (divided by its length in
        characters, :attr:`Choices.characters`: lm-eval's ``acc_norm``); where the split carries their rows,
        ``accuracy_calibrated`` (the sum minus the option's summed log-probability after the content-free prompt,
        :data:`CALIBRATION_FIELDS`: one more prompt) and ``accuracy_channel`` (the summed log-probability of the
        prompt written after the option, :data:`CHANNEL_FIELDS`). ``correct_probability``: the
        probability mass on the correct options, normalised over the example's options (a softmax of
        the sums): it moves before argmax accuracy does. An example with several correct outputs
        (choice rows marked :attr:`Choices.correct`) is an exact match when greedy decoding writes any of them
        (and its end token); a multiple-choice example, when greedy decoding writes a correct option's tokens.
        ``parallel``: under ``torch.func.vmap`` the options are scored without host syncs
        (:meth:`option_scores`). ``prefixes``: the rows of a mask field (``attention_mask``, or an option field's
        mask, :data:`CHOICE_ATTENTION_MASK`, ...) continue after ``prefixes[mask]``, run once for them all
        (MetaICL's demonstrations): the same metrics as the rows written after its tokens. ``generation``: the
        task's :class:`~lightning_meta.data.tasks.GenerationRule` (BIG-bench's ``stop_string`` and ``output_regex``):
        an example without options is then an exact match when its greedily generated output (:meth:`generate`), cut
        by the rule, is one of its correct outputs, whatever follows the cut (no end token asked); not under
        ``parallel`` (``vmap``, where decoding cannot run) nor with ``prefixes``, where the check above stays.
        """
        prefixes = prefixes or {}
        with torch.no_grad():
            labels = _labels(split)
            read = self.read_logits(self._inputs_after(split, prefixes.get("attention_mask")), labels[:, 1:], params)
            loss = F.cross_entropy(read.logits, read.targets, ignore_index=IGNORE_INDEX)
            metrics = {"loss": loss}
            if "labels" not in split:
                return metrics
            exact = read.greedy(len(labels))
            if generation is not None and generation.cuts and not parallel and not prefixes:
                exact = self._generated_matches(split, params, generation, exact)
            choices = Choices.read(split)
            if choices is not None:
                grades, writes_correct = self._choices(split, choices, params, parallel, prefixes)
                exact = exact | writes_correct  # several correct outputs: greedy decoding may write any of them
                grades = {
                    ("correct_" if rule == "probability" else "accuracy_") + rule: grade
                    for rule, grade in grades.items()
                }
                grades = {"accuracy": grades[f"accuracy_{self.scoring}"]} | grades  # _choices checks it is there
                for name, grade in grades.items():
                    metrics[name] = torch.where(choices.multiple_choice, grade, exact.to(grade.dtype)).mean()
            metrics["exact_match"] = exact.float().mean()
            return metrics

    def generate(self, prompt: Tensor, params: Mapping[str, Tensor] | None, max_new_tokens: int) -> list[int]:
        """Greedy decoding after ``prompt`` (1-D token ids) at ``params``: up to ``max_new_tokens`` tokens (fewer
        at the model's context), the end token ending it (and left out). One forward per token (evaluation only)."""
        tokens = prompt.tolist()
        generated: list[int] = []
        eos = self.transformer.config.eos_token_id
        limit = min(max_new_tokens, (self.max_positions or len(tokens) + max_new_tokens) - len(tokens))
        for _ in range(limit):
            ids = torch.tensor([tokens + generated], device=prompt.device)
            logits = self.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, params)
            token = int(logits[0, -1].argmax())
            if token == eos:
                break
            generated.append(token)
        return generated

    def _generated_matches(
        self, split: Split, params: Mapping[str, Tensor] | None, rule: GenerationRule, exact: Tensor
    ) -> Tensor:
        """``exact`` with each example without options (:attr:`Choices.multiple_choice` false, or every example of a
        split without choices)
        judged by its generated output, cut by ``rule``, against its correct outputs (its ``labels``' output and, with
        several, its correct choice rows), as BIG-bench's ``exact_str_match`` compares them. The text between
        prompt and output (a space, or none after a prompt ending in whitespace) is not part of either. Decodes up to
        :data:`GENERATED_TOKENS_PAST_TARGET` tokens past the longest correct output."""
        tokenizer = load_tokenizer(self.tokenizer)
        labels = split["labels"]
        choices = Choices.read(split)
        rows = range(len(labels)) if choices is None else torch.nonzero(~choices.multiple_choice).flatten().tolist()
        matches = exact.clone()
        for row in rows:
            labelled = torch.nonzero(labels[row] != IGNORE_INDEX).flatten()
            if not len(labelled):
                continue
            targets = [labels[row, labelled].tolist()]
            if choices is not None:
                for option in torch.nonzero(choices.correct[row]).flatten().tolist():
                    row_labels = choices.labels[row, option]
                    targets.append(row_labels[row_labels != IGNORE_INDEX].tolist())
            eos = self.transformer.config.eos_token_id
            texts = [tokenizer.decode(target[:-1] if target and target[-1] == eos else target) for target in targets]
            joint = " " if texts[0].startswith(" ") else ""
            prompt = split["input_ids"][row, : int(labelled[0])]
            longest = max(map(len, targets))
            written = tokenizer.decode(self.generate(prompt, params, longest + GENERATED_TOKENS_PAST_TARGET))
            response = rule.apply(written.removeprefix(joint))
            matches[row] = response in {text.removeprefix(joint) for text in texts}
        return matches

    def _choices(
        self,
        split: Split,
        choices: Choices,
        params: Mapping[str, Tensor] | None,
        parallel: bool,
        prefixes: Mapping[str, Prefix],
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per example: the grade of the option each scoring rule chooses (``sum``: the highest summed
        log-probability; ``per_token``: the highest per token), and whether greedy decoding writes a
        correct choice row (:attr:`Choices.correct`). A chosen option's grade is its :attr:`Choices.credit`
        (BIG-bench's ``multiple_choice_grade``: partial credit).

        Only examples with a correct row are scored (one host sync, at evaluation only); at least
        one row always runs, so that every rank of a sharded model runs the same forwards. With
        ``parallel`` (under ``torch.func.vmap``, where shapes cannot depend on the data) every example
        is scored; one without a correct row comes out false all the same.
        """
        rule_rows = {rule: fields for rule, (fields, _) in _RULE_ROWS.items() if fields[0] in split}
        rule_prefixes = {rule: prefixes.get(fields[1]) for rule, fields in rule_rows.items()}
        rule_prefixes["sum"] = prefixes.get(CHOICE_ATTENTION_MASK)
        if self.scoring in _RULE_ROWS and self.scoring not in rule_rows:
            fields, source = _RULE_ROWS[self.scoring]
            raise ValueError(
                f"scoring={self.scoring!r} needs the split's {fields[0]} rows, which this split lacks: they come with "
                f"{source} (TextToTextTasksDataModule), or choose another scoring rule."
            )
        if parallel:
            others = {rule: tuple(split[name] for name in fields) for rule, fields in rule_rows.items()}
            return self._choice_flags(choices, params, parallel, others, rule_prefixes)
        listed_rows = torch.nonzero(choices.scored).flatten()
        # Without any, row 0 runs (its correct row is all false, so are its flags).
        rows = listed_rows if len(listed_rows) else listed_rows.new_zeros(1)
        others = {rule: tuple(split[name][rows] for name in fields) for rule, fields in rule_rows.items()}
        grades, writes_correct = self._choice_flags(choices.rows(rows), params, others=others, prefixes=rule_prefixes)
        # Examples not scored (no correct row) grade 0, as an unscored parallel example does.
        examples = choices.multiple_choice.shape
        grades = {rule: grade.new_zeros(examples).index_put((rows,), grade) for rule, grade in grades.items()}
        return grades, torch.zeros(examples, dtype=torch.bool, device=rows.device).index_put((rows,), writes_correct)

    def _choice_flags(
        self,
        choices: Choices,
        params: Mapping[str, Tensor] | None,
        parallel: bool = False,
        others: Mapping[str, tuple[Tensor, Tensor, Tensor]] | None = None,
        prefixes: Mapping[str, Prefix | None] | None = None,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`_choices`' grades (and ``probability``) and greedy flags for the examples of ``choices``;
        ``others``: the rows of the ``calibrated`` and ``channel`` rules, by rule (ids, mask and labels shaped like
        the options'), where the split has them;
        ``prefixes``: the :class:`Prefix` each rule's rows continue after (``sum``: the options'), by rule."""
        prefixes = prefixes or {}
        ids, mask, labels, correct = choices.input_ids, choices.attention_mask, choices.labels, choices.correct
        scores, greedy = self.option_scores(ids, mask, labels, params, parallel=parallel, prefix=prefixes.get("sum"))
        rules = {  # padding options stay -inf under every rule
            "sum": scores,
            "per_token": scores / (labels != IGNORE_INDEX).sum(-1).clamp_min(1),
            "per_char": scores / choices.characters.clamp_min(1),
        }
        for rule, rows in (others or {}).items():
            other, _ = self.option_scores(*rows, params, parallel=parallel, prefix=prefixes.get(rule))
            # calibrated: log p(option | prompt) - log p(option | content-free prompt); channel: log p(prompt | option)
            rules[rule] = torch.where(scores.isfinite(), scores - other, scores) if rule == "calibrated" else other
        grades = {
            rule: choices.credit.gather(1, values.argmax(1, keepdim=True))[:, 0] for rule, values in rules.items()
        }
        # The probability mass on the correct options among the example's options (a softmax of the sums): it moves
        # before the argmax does.
        grades["probability"] = (torch.softmax(scores, 1) * correct).sum(1)
        return grades, (greedy & correct).any(1)

    def option_scores(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        params: Mapping[str, Tensor] | None = None,
        *,
        parallel: bool = False,
        prefix: Prefix | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per option of each example: the summed log-probability of its labelled tokens, and whether
        greedy decoding writes them.

        The tensors are ``(examples, options, tokens)``, each option written after its example's
        prompt (:data:`CHOICE_FIELDS`), right- or left-padded; options without labels (padding) score
        ``-inf``. The tokens every option of an example shares (its prompt; under MetaICL with the
        demonstrations) run once, and the options continue from their cached keys and values,
        expanded over the options: the same metrics as one full forward per option, at the cost
        of one prompt. Works with ``params`` (fast weights) and LoRA. One host sync.

        ``parallel``: the call runs under ``torch.func.vmap`` (the episodes of an evaluation batch
        together), where shapes cannot depend on the data: each option then runs its whole row
        (one full forward per option: the same metrics, no host sync, at ``options`` times the
        prompt's cost). ``prefix``: every row continues after it (:meth:`evaluation_metrics`).
        """
        examples, options, tokens = input_ids.shape
        # What follows reads each row as prompt-then-option from position 0 (right padding). A stable sort on
        # "padding" moves the real tokens of any row (left-padded by a tokenizer's padding_side='left') there,
        # in order: a score is then the unpadded sequence's, as one forward of prompt and option alone gives.
        order = torch.argsort((attention_mask == 0).to(torch.uint8), dim=-1, stable=True)
        input_ids, attention_mask, labels = (tensor.gather(-1, order) for tensor in (input_ids, attention_mask, labels))
        labelled = labels != IGNORE_INDEX
        valid = labelled.any(-1)
        if parallel:
            ids, mask, targets = input_ids.flatten(0, 1), attention_mask.flatten(0, 1), labels.flatten(0, 1)[:, 1:]
            extra: dict[str, Any] = {} if prefix is None else prefix.continued(mask)
            mask = extra.pop("attention_mask", mask)
        else:
            ids, mask, targets, extra = self._continuations(input_ids, attention_mask, labels, params, prefix)
        read = self.read_logits({"input_ids": ids, "attention_mask": mask} | extra, targets, params)
        token_log_probs = torch.log_softmax(read.logits, -1).gather(-1, read.targets.clamp_min(0)[:, None])[:, 0]
        scores = read.per_row(token_log_probs.masked_fill(read.targets == IGNORE_INDEX, 0), len(ids))
        scores = scores.view(examples, options).masked_fill(~valid, -torch.inf)
        greedy = read.greedy(len(ids)).view(examples, options) & valid
        return scores, greedy

    def _continuations(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        params: Mapping[str, Tensor] | None,
        prefix: Prefix | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
        """The options' rows past the tokens each example's options share, with the shared tokens' cached keys and
        values (after ``prefix``'s): :meth:`option_scores`' forward without ``parallel`` (one host sync, for the
        widths)."""
        examples, options, tokens = input_ids.shape
        labelled = labels != IGNORE_INDEX
        valid = labelled.any(-1)
        reference = valid.float().argmax(1)  # the first real option of each example
        rows = torch.arange(examples, device=input_ids.device)
        reference_ids, reference_mask = input_ids[rows, reference], attention_mask[rows, reference]
        differs = (input_ids != reference_ids[:, None]) | (attention_mask != reference_mask[:, None])
        first_label = torch.where(valid, labelled.float().argmax(-1), tokens)
        first_difference = torch.where(differs.any(-1), differs.float().argmax(-1), tokens)
        shared = torch.minimum(first_label, first_difference).masked_fill(~valid, tokens).amin(1)
        # The last shared token runs with the options: its logits predict their first token.
        prefix_lengths = (shared - 1).clamp_min(0).masked_fill(~valid.any(1), 0)
        continuation_lengths = (attention_mask.sum(-1) - prefix_lengths[:, None]).clamp_min(0)
        shared_width, width = torch.stack([prefix_lengths.max(), continuation_lengths.max()]).tolist()
        positions = prefix_lengths[:, None, None] + torch.arange(max(width, 1), device=input_ids.device)
        positions = positions.expand(examples, options, -1)
        taken = positions.clamp_max(tokens - 1)
        continuation_mask = positions - prefix_lengths[:, None, None] < continuation_lengths[..., None]
        ids = input_ids.gather(-1, taken).masked_fill(~continuation_mask, 0).flatten(0, 1)
        targets = labels.gather(-1, taken).masked_fill(~continuation_mask, IGNORE_INDEX).flatten(0, 1)[:, 1:]
        mask = continuation_mask.flatten(0, 1).to(attention_mask.dtype)
        extra: dict[str, Any] = {}
        if shared_width:
            seen = (torch.arange(shared_width, device=input_ids.device) < prefix_lengths[:, None]).to(mask.dtype)
            # An empty prefix attends to one position in its own forward, so that nothing it caches is NaN.
            prefix_mask = seen.clone()
            prefix_mask[:, 0] = 1
            before = {} if prefix is None else prefix.continued(prefix_mask)
            cache = self(
                input_ids=reference_ids[:, :shared_width],
                **({"attention_mask": prefix_mask} | before),
                use_cache=True,
                logits_to_keep=1,
                params=params,
            ).cache
            cache.batch_repeat_interleave(options)
            mask = torch.cat([seen.repeat_interleave(options, 0), mask], 1)
            extra = {"cache": cache, "position_ids": positions.flatten(0, 1)}
        if prefix is not None:  # the tokens before the rows: in the cache, seen by every row, positions after them
            if not shared_width:
                extra = {"cache": prefix.continued(mask)["cache"], "position_ids": positions.flatten(0, 1)}
            mask = torch.cat([mask.new_ones(mask.shape[0], prefix.length), mask], 1)
            extra["position_ids"] = extra["position_ids"] + prefix.length
        return ids, mask, targets, extra

    def vmap_refusal(self) -> str | None:
        implementation = attention_implementation(self.transformer)
        if implementation != "eager":
            return (
                f"{implementation!r} attention inspects the mask's values (data-dependent control flow); "
                "attn_implementation='eager' runs under vmap"
            )
        return super().vmap_refusal()

    def prepare_second_order(self) -> None:
        # Fused SDPA kernels have no double backward ("derivative for
        # aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").
        if (implementation := attention_implementation(self.transformer)) != "eager":
            rank_zero_info(
                f"Second-order MAML: switching {type(self.transformer).__name__} from "
                f"{implementation!r} to eager attention (fused attention kernels "
                "have no double backward). Use FOMAML or first_order=True to keep fused attention."
            )
            self.transformer.set_attn_implementation("eager")


@dataclass
class ReadLogits:
    """:meth:`CausalLMLearner.read_logits`: float32 ``logits`` ``(read positions, vocabulary)`` and their
    ``targets``; ``rows`` and ``positions``: where each was read (``None``: every position of every sequence, in
    order, the targets ``-100`` where not read)."""

    logits: Tensor
    targets: Tensor
    rows: Tensor | None
    positions: Tensor | None

    def at(self, values: Tensor) -> Tensor:
        """``values`` ``(sequences, positions)`` (aligned with the targets) at the read positions."""
        return values.flatten() if self.rows is None else values[self.rows, self.positions]

    def per_row(self, values: Tensor, sequences: int) -> Tensor:
        """``values`` (one per read position) summed per sequence."""
        if self.rows is None:
            return values.view(sequences, -1).sum(1)
        return values.new_zeros(sequences).index_add(0, self.rows, values)

    def greedy(self, sequences: int) -> Tensor:
        """Per sequence: whether greedy decoding writes every read target (each the most likely next token)."""
        wrong = (self.logits.argmax(-1) != self.targets) & (self.targets != IGNORE_INDEX)
        return self.per_row(wrong.float(), sequences) == 0


@contextlib.contextmanager
def _head_reads(head: nn.Module, rows: Tensor, positions: Tensor) -> Iterator[None]:
    """Inside: the output embeddings run only on the hidden states at ``(rows, positions)``, as one sequence.

    A pre-hook on the head rather than a head applied here: whatever the model does after its head (a logit
    scale, soft-capping) still applies, to the gathered logits.
    """

    def gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows, positions][None], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()


def _float32(logits: Tensor) -> Tensor:
    """Logits reduced in float32 under low precision, for a stable loss."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _labels(split: Split) -> Tensor:
    """The split's ``labels``, else its tokens with padding ignored (language modelling)."""
    labels = split.get("labels")
    if labels is None:
        labels = split["input_ids"].masked_fill(split["attention_mask"] == 0, IGNORE_INDEX)
    return labels
