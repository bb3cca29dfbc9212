"""How a causal-LM learner is evaluated on text tasks: the loss, greedy exact match, generated outputs cut as
BIG-bench cuts them, and per-option scores by five rules (rank classification), with the options' shared prompt
run once (:class:`Prefix`, cached keys and values)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache, DynamicCache

from lightning_meta.data.tasks import (
    CALIBRATION_FIELDS,
    CHANNEL_FIELDS,
    CHOICE_ATTENTION_MASK,
    IGNORE_INDEX,
    Choices,
    GenerationRule,
    Split,
)
from lightning_meta.data.tokenization import load_tokenizer

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


class CausalLMEvaluation:
    """The evaluation side of :class:`~lightning_meta.learners.language_models.CausalLMLearner`, mixed into it as
    transformers mixes ``GenerationMixin`` into its models. It reads the model only through the learner's
    ``read_logits``, ``predict``, ``_inputs_after`` and forward (``self(...)``), and its ``transformer``,
    ``max_positions``, ``tokenizer`` and ``scoring``."""

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
            labels = split_labels(split)
            read = self.read_logits(self._inputs_after(split, prefixes.get("attention_mask")), labels[:, 1:], params)
            loss = F.cross_entropy(read.logits, read.targets, ignore_index=IGNORE_INDEX)
            metrics = {"loss": loss}
            if "labels" not in split:
                return metrics
            exact = read.greedy(len(labels))
            choices = Choices.read(split)
            if generation is not None and generation.cuts and not parallel and not prefixes:
                exact = self._generated_matches(split, choices, params, generation, exact)
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
        self,
        split: Split,
        choices: Choices | None,
        params: Mapping[str, Tensor] | None,
        rule: GenerationRule,
        exact: Tensor,
    ) -> Tensor:
        """``exact`` with each example without options (:attr:`Choices.multiple_choice` false, or every example of a
        split without ``choices``) judged by its generated output, cut by ``rule``, against its correct outputs (its
        ``labels``' output and, with several, its correct choice rows), as BIG-bench's ``exact_str_match`` compares
        them. The text between prompt and output (a space, or none after a prompt ending in whitespace) is not part
        of either. Decodes up to :data:`GENERATED_TOKENS_PAST_TARGET` tokens past the longest correct output."""
        tokenizer = load_tokenizer(self.tokenizer)
        labels = split["labels"]
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


def split_labels(split: Split) -> Tensor:
    """The split's ``labels``, else its tokens with padding ignored (language modelling)."""
    labels = split.get("labels")
    if labels is None:
        labels = split["input_ids"].masked_fill(split["attention_mask"] == 0, IGNORE_INDEX)
    return labels
