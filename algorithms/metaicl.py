"""MetaICL: meta-training a causal LM to learn from in-context demonstrations."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.tasks import (
    CALIBRATION_FIELDS,
    CHANNEL_FIELDS,
    CHOICE_FIELDS,
    DEMONSTRATION_FIELDS,
    IGNORE_INDEX,
    LABEL_WEIGHTS,
    POSITION_IDS,
    SEGMENT_IDS,
    TASK_PREFIX_LENGTH,
    Choices,
    Episode,
    Split,
    TaskBatch,
    channel_sequences,
    generation_rule,
    padded_length,
    padding_fraction,
)
from lightning_meta.learners.base import FastWeights, Learner
from lightning_meta.learners.language_models import CausalLMLearner
from lightning_meta.learners.lm_evaluation import Prefix
from lightning_meta.training.algorithm import MetaAlgorithm, MetaBatchMode, MetaBatchRunner, MetaLoss

#: Field of a query split whose sequences already carry their demonstrations: how many each query dropped.
DROPPED = "dropped_demonstrations"


class MetaICL(MetaAlgorithm):
    """Min, Lewis, Zettlemoyer & Hajishirzi, "MetaICL: Learning to Learn In Context", NAACL 2022.

    No inner loop. Each query example is preceded, in one sequence, by the task's support
    examples (the demonstrations, in their episode order); the loss is the query's output
    tokens' cross-entropy, so training is ordinary LM training on in-context episodes. Adapting
    to a task at evaluation is conditioning on its support: ``*_pre`` metrics are zero-shot (the
    query alone), ``*_post`` metrics K-shot.

    The sequences respect the context: when the demonstrations and the query do not fit in
    ``max_length`` tokens (by default the model's context), the demonstrations farthest from
    the query are dropped, whole, never the query. ``train/dropped_demonstrations`` logs how
    many were dropped per query on average (0 when everything fits). Works with any causal-LM
    learner whose splits hold ``input_ids``, ``attention_mask`` and ``labels`` on the output
    tokens (:class:`~lightning_meta.datamodules.TextToTextTasksDataModule`); the demonstrations
    keep their own tokens (output included, end token as separator) and carry no loss, unless
    ``demonstration_loss``.

    Evaluation writes the demonstrations as training does, unless the evaluation splits carry BIG-bench's
    (``TextToTextTasksDataModule(demonstrations="bigbench")``): the direct and calibration rows are then written in
    BIG-bench's K-shot layout (``bigbench/api/json_task.py``): the task prefix once, each demonstration as
    the task's input and output prefixes around its input and output, separated by the task's example separator
    (``"\\n"``), then the query without the task prefix. Training keeps the paper's layout.

    Args:
        max_length: longest sequence, in tokens; ``None``: the learner's context
            (``max_position_embeddings``).
        demonstration_loss: in training, also take the loss on each demonstration's output (predicted from
            the demonstrations before it), as Garg et al. (2022) and Chan et al. (2022) train in-context
            learners: a sequence of K demonstrations then teaches 0- to K-shot prediction at once, K + 1
            outputs instead of one. Evaluation's metrics stay the query's.
        direction: ``"direct"``: the loss is on each query's output after the demonstrations; ``"channel"``
            (Channel MetaICL, Min et al. 2022): demonstrations and queries are written output-then-input
            (the datamodule's channel sequences, ``TextToTextTasksDataModule(channel=True)``) and the loss is
            on the query's input given its output. Evaluation scores the options by every rule either way:
            the direct and calibration rows after the demonstrations written directly, the channel rows
            (``accuracy_channel``; ``CausalLMLearner(scoring="channel")`` makes it ``accuracy``) after the
            demonstrations written channel-style, as MetaICL's code conditions each method.

        encode_demonstrations_once: run an episode's demonstrations once for all its queries, where that is exact
            (every query keeps every demonstration): in training, one packed row per episode (the demonstrations,
            then each query after them, each query attending to the demonstrations and to itself only, its positions
            counted on from the demonstrations; a demonstration's label, under ``demonstration_loss``, weighs as
            many queries as read it, as it counts once per query's sequence); in evaluation, the demonstrations'
            keys and values, computed once and continued by every query, option and calibration row. The loss,
            its gradient and every figure equal those of one sequence per query (tested in float64). Elsewhere,
            and with ``False``, one sequence per query; a model that cannot take the block mask
            (:meth:`~lightning_meta.CausalLMLearner.block_mask_refusal`) trains that way, the reason logged once.

    Example::

        from lightning_meta.algorithms import MetaICL
        metaicl = MetaICL()
        metaicl.meta_loss(learner, task_batch).loss.backward()   # loss on the query outputs
        metrics = metaicl.evaluate(learner, episode)              # zero-shot (_pre), K-shot (_post)
    """

    def __init__(
        self,
        max_length: int | None = None,
        demonstration_loss: bool = False,
        direction: Literal["direct", "channel"] = "direct",
        encode_demonstrations_once: bool = True,
    ) -> None:
        super().__init__()
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens or None (the model's context), got {max_length}.")
        if direction not in ("direct", "channel"):
            raise ValueError(
                f"MetaICL direction={direction!r} is not a direction: use 'direct' or 'channel' "
                "(--model.algorithm.init_args.direction)."
            )
        self.direction = direction
        self.max_length = max_length
        self.demonstration_loss = demonstration_loss
        self.encode_demonstrations_once = encode_demonstrations_once
        self._packing_refusals: set[str] = set()  # reasons logged once

    def check_learner(self, learner: Learner) -> None:
        if learner.task_type != "language_modeling":
            raise ValueError(
                f"MetaICL conditions a causal LM on demonstrations; {type(learner).__name__} is a "
                f"{learner.task_type} learner. Use CausalLMLearner with TextToTextTasksDataModule."
            )

    def check_data(self, learner: Learner, batch: TaskBatch) -> None:
        """Examples with their output marked (``labels``), then the learner's checks."""
        _check_output_labels(batch)
        super().check_data(learner, batch)

    def context_length(self, learner: Learner) -> int:
        """Tokens a sequence may hold: ``max_length``, at most the model's context (``learner.max_positions``)."""
        limits = [limit for limit in (self.max_length, learner.max_positions) if limit is not None]
        if not limits:
            raise ValueError(
                f"MetaICL cannot tell the context length of {type(learner).__name__}: set max_length "
                "(--model.algorithm.init_args.max_length=...)."
            )
        return min(limits)

    def meta_loss(
        self,
        learner: Learner,
        batch: TaskBatch,
        *,
        meta_batch: MetaBatchMode | MetaBatchRunner = "auto",
        outer_step: int | None = None,
        report_query: bool | None = None,
    ) -> MetaLoss:
        """:meth:`MetaAlgorithm.meta_loss` on the batch's in-context sequences, built first for all episodes.

        The one algorithm that changes the batch before the runner runs its task loss (ARCHITECTURE.md, "The
        meta-step"). With ``encode_demonstrations_once``, one packed row per episode where exact
        (:meth:`packed_queries`); otherwise every sequence is as long as the batch's longest real concatenation
        (rounded up to a multiple of 8), not ``(shots + 1)`` padded examples. Either way finding the length is
        one host sync per batch, besides the data check's.
        """
        self.check_learner(learner)
        _check_output_labels(batch)
        step = {"meta_batch": meta_batch, "outer_step": outer_step, "report_query": report_query}
        support, query = self.loss_rows(batch.support), self.loss_rows(batch.query)
        packed = self.packed_queries(learner, support, query) if self.encode_demonstrations_once else None
        if packed is not None:
            return super().meta_loss(
                learner, TaskBatch(batch.support, packed, batch.ways, batch.shots, batch.metadata), **step
            )
        length = self.sequence_length(learner, support, query)
        episodes = [
            Episode(
                episode.support,
                self.conditioned(learner, episode.support, episode.query, False, length, self.demonstration_loss)[0],
                episode.ways,
                episode.shots,
                episode.metadata,
            )
            for episode in batch.episodes()
        ]
        return super().meta_loss(learner, TaskBatch.stack(episodes), **step)

    def packing_refusal(self, learner: Learner) -> str | None:
        """Why ``learner`` cannot train on packed rows (one sequence per query then), or ``None``."""
        if not isinstance(learner, CausalLMLearner):
            return f"{type(learner).__name__} is not a CausalLMLearner, whose model_inputs build the block mask"
        return learner.block_mask_refusal()

    def packed_queries(self, learner: Learner, support: Split, query: Split) -> dict[str, Tensor] | None:
        """A meta-batch's query split as one packed row per episode, each query after the demonstrations once,
        or ``None`` where packing would not be exact (some query drops a demonstration, the packed row outgrows
        the context, a support without tokens) or the learner cannot take it (:meth:`packing_refusal`, logged
        once). ``support`` and ``query`` are :meth:`loss_rows` of the meta-batch's splits; one host sync.

        Row layout: the demonstrations' real tokens but the last (segment 0, read by every query), then for each
        query q (segment q + 1) the last demonstration token (the original for the first query, a copy for the
        others, at the same position: its outputs predict each query's first token) and the query's real tokens,
        at positions counted on from the demonstrations; :data:`SEGMENT_IDS`, :data:`POSITION_IDS` and, with
        ``demonstration_loss``, :data:`LABEL_WEIGHTS` (a demonstration's label weighs the number of queries, as it
        counts once in each query's sequence) tell the learner.
        """
        refusal = self.packing_refusal(learner)
        if refusal is not None:
            if refusal not in self._packing_refusals:
                self._packing_refusals.add(refusal)
                rank_zero_info(f"MetaICL: one sequence per query ({refusal}).")
            return None
        context = self.context_length(learner)
        demo_mask = support["attention_mask"].bool().flatten(-2)  # (episodes, demonstration tokens)
        query_mask = query["attention_mask"].bool()  # (episodes, queries, tokens)
        episodes, queries, _ = query_mask.shape
        demo_lengths, query_lengths = demo_mask.sum(-1), query_mask.sum(-1)
        row_lengths = demo_lengths - 1 + queries + query_lengths.sum(-1)
        longest_row, fitting, shortest_demonstrations = torch.stack(
            [row_lengths.max(), (demo_lengths + query_lengths.amax(-1) <= context).all().long(), demo_lengths.min()]
        ).tolist()
        if not fitting or shortest_demonstrations < 1 or longest_row > context:
            return None
        demo_positions = demo_mask.cumsum(-1) - 1
        last = demo_mask & (demo_positions == (demo_lengths - 1)[:, None])  # the last demonstration token
        last_ids = (support["input_ids"].flatten(-2) * last).sum(-1)
        if self.demonstration_loss:
            demo_labels = support["labels"].flatten(-2)
        else:
            demo_labels = torch.full_like(demo_mask, IGNORE_INDEX, dtype=query["labels"].dtype)
        per_query = (episodes, queries, 1)
        first_column = torch.arange(queries, device=query_mask.device)[None, :, None].expand(per_query)
        pieces = {  # (demonstrations' tokens, queries' tokens) of each field, every query led by the last demo token
            "input_ids": (
                support["input_ids"].flatten(-2),
                torch.cat([last_ids[:, None, None].expand(per_query), query["input_ids"]], -1),
            ),
            "attention_mask": (demo_mask, torch.cat([first_column > 0, query_mask], -1)),
            "labels": (demo_labels, F.pad(query["labels"], (1, 0), value=IGNORE_INDEX)),
            POSITION_IDS: (demo_positions, (demo_lengths - 1)[:, None, None] + F.pad(query_mask.cumsum(-1), (1, 0))),
            SEGMENT_IDS: (last.long(), (first_column + 1).expand(-1, -1, query_mask.shape[-1] + 1)),
            LABEL_WEIGHTS: (
                torch.full(demo_mask.shape, float(queries), device=demo_mask.device),
                torch.ones(query_mask.shape[:-1] + (query_mask.shape[-1] + 1,), device=demo_mask.device),
            ),
        }
        if not self.demonstration_loss:  # every weight 1: a plain mean
            del pieces[LABEL_WEIGHTS]
        joined = {name: torch.cat([demo, queried.flatten(-2)], -1) for name, (demo, queried) in pieces.items()}
        kept = joined["attention_mask"]
        length = padded_length(longest_row, context)
        # A stable sort on "dropped" moves the kept tokens to the front, in order (as with_demonstrations does).
        order = torch.argsort((~kept).to(torch.uint8), dim=-1, stable=True)[:, :length]
        kept = kept.gather(-1, order)
        padding = {
            "input_ids": 0,
            "attention_mask": False,
            "labels": IGNORE_INDEX,
            POSITION_IDS: 0,
            SEGMENT_IDS: -1,
            LABEL_WEIGHTS: 0.0,
        }
        packed = {
            name: tensor.gather(-1, order).masked_fill(~kept, padding[name])[:, None] for name, tensor in joined.items()
        }
        packed["attention_mask"] = packed["attention_mask"].to(query["attention_mask"].dtype)
        packed[DROPPED] = torch.zeros(episodes, 1, dtype=torch.long, device=kept.device)
        return packed

    def sequence_length(self, learner: Learner, support: Split, query: Split, options: bool = False) -> int:
        """Tokens per in-context sequence: the longest real concatenation of the query (or, with
        ``options``, of its options) after the demonstrations that fit, rounded up to a multiple of
        8, at most the context. Takes splits of one episode or of a meta-batch; one host sync.
        """
        context = self.context_length(learner)
        names = CHOICE_FIELDS if options else ("input_ids", "attention_mask", "labels")
        mask = query[names[1]]
        query_lengths = mask.sum(-1)
        if options:  # every option of an example sees the demonstrations that fit beside its longest option
            query_lengths = query_lengths.amax(-1, keepdim=True).expand_as(query_lengths).flatten(-2)
        _, lengths = demonstrations_kept(support["attention_mask"], query_lengths, context)
        longest, longest_query = torch.stack([lengths.max(), query_lengths.max()]).tolist()
        if longest_query > context:
            raise ValueError(
                f"A query example is {longest_query} tokens long (prompt and output) but MetaICL's context is "
                f"{context} tokens: the query alone would not fit. Set the datamodule's max_length to {context} or "
                "less (longer examples are then refused or cut there), or raise MetaICL's max_length up to the "
                "model's context."
            )
        return padded_length(longest, context)

    def loss_rows(self, split: Split) -> dict[str, Tensor]:
        """``split`` with the sequences that carry the loss as its ``input_ids``, ``attention_mask`` and ``labels``:
        its own (``direct``), or its channel sequences (``channel``: output, then input, the loss on the input)."""
        return dict(split) if self.direction == "direct" else channel_sequences(split, "MetaICL(direction='channel')")

    def conditioned(
        self,
        learner: Learner,
        support: Split,
        query: Split,
        options: bool = True,
        length: int | None = None,
        demonstration_labels: bool = False,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The query split with the support as demonstrations, and the demonstrations dropped per query.

        Sequences are ``length`` tokens long (default :meth:`sequence_length`, one host sync). A
        query split built already (it holds :data:`DROPPED`) is returned as it is. With
        ``options``, option fields (:data:`~lightning_meta.data.tasks.CHOICE_FIELDS`) get the same
        demonstrations, so that options are scored in context; every option of an example gets
        the same ones (those that fit beside its longest option), so they share one prompt. With
        ``demonstration_labels``, the demonstrations' outputs keep their labels (``demonstration_loss``).
        The sequences are :meth:`loss_rows`' (channel-style under ``direction="channel"``). The calibration
        rows (:data:`~lightning_meta.data.tasks.CALIBRATION_FIELDS`) get the options' demonstrations (those that
        fit beside the example's longest option), so that the content-free prompt is read in the same context,
        as Zhao et al. (2021) calibrate in-context prompts; the channel option rows
        (:data:`~lightning_meta.data.tasks.CHANNEL_FIELDS`) get the support's channel sequences.
        """
        if DROPPED in query:
            return dict(query), query[DROPPED]
        context = self.context_length(learner)
        support_rows, query_rows = self.loss_rows(support), self.loss_rows(query)
        # In evaluation, BIG-bench's layout where the splits carry it: the support as BIG-bench demonstrations, and
        # each direct row's task prefix (its first TASK_PREFIX_LENGTH tokens) moved before them.
        demonstrations, lead = dict(support), None
        if options and DEMONSTRATION_FIELDS[0] in support:
            demonstrations = dict(
                zip(("input_ids", "attention_mask"), (support[name] for name in DEMONSTRATION_FIELDS), strict=True)
            )
            lead = query[TASK_PREFIX_LENGTH]
        direct_lead = lead if self.direction == "direct" else None
        if direct_lead is not None:
            support_rows = demonstrations
        if length is None:
            length = self.sequence_length(learner, support_rows, query_rows)
        fields = (query_rows[name] for name in ("input_ids", "attention_mask", "labels"))
        conditioned, dropped = with_demonstrations(
            support_rows, *fields, context, length, demonstration_labels=demonstration_labels, lead_lengths=direct_lead
        )
        built = dict(zip(("input_ids", "attention_mask", "labels"), conditioned, strict=True))
        built[DROPPED] = dropped
        query_choices = Choices.read(query) if options else None
        if query_choices is not None:
            ids, mask, labels = query_choices.input_ids, query_choices.attention_mask, query_choices.labels
            examples, count, _ = ids.shape
            longest = mask.sum(-1).amax(-1, keepdim=True).expand(examples, count).flatten()
            choice_length = self.sequence_length(learner, demonstrations, query, options=True)
            choice_lead = None if lead is None else lead[:, None].expand(examples, count).flatten()
            rows, _ = with_demonstrations(
                demonstrations,
                ids.flatten(0, 1),
                mask.flatten(0, 1),
                labels.flatten(0, 1),
                context,
                choice_length,
                longest,
                lead_lengths=choice_lead,
            )
            ids, mask, labels = (tensor.view(examples, count, -1) for tensor in rows)
            in_context = dataclasses.replace(query_choices, input_ids=ids, attention_mask=mask, labels=labels)
            built |= in_context.fields()
            if CALIBRATION_FIELDS[0] in query:
                built |= _option_rows(demonstrations, query, CALIBRATION_FIELDS, CHOICE_FIELDS, context, lead)
            if CHANNEL_FIELDS[0] in query:
                channel_support = channel_sequences(support, "Scoring the channel rows in context")
                built |= _option_rows(channel_support, query, CHANNEL_FIELDS, CHANNEL_FIELDS, context)
        return built, dropped

    def task_loss(
        self, learner: Learner, episode: Episode, *, parallel: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        query, dropped = self.conditioned(
            learner, episode.support, episode.query, options=False, demonstration_labels=self.demonstration_loss
        )
        loss, found = learner.loss(query)
        metrics = {f"query_{name}": value for name, value in found.items()}
        return loss, metrics | {
            "dropped_demonstrations": dropped.float().mean(),
            "padding_fraction": padding_fraction(query["attention_mask"]),
        }

    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        """MetaICL adapts by conditioning, not by changing weights: the learner's fast weights, unchanged."""
        return {name: weight.detach() for name, weight in learner.fast_parameters().items()}

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query metrics zero-shot (``*_pre``) and conditioned on the support (``*_post``); with
        ``encode_demonstrations_once``, from the demonstrations' keys and values where exact
        (:meth:`after_demonstrations`)."""
        self.check_learner(learner)
        # Generated outputs are read after direct prompts only (a channel row's labels are its input).
        rule = generation_rule(episode.metadata) if self.direction == "direct" else None
        before = learner.evaluation_metrics(self.loss_rows(episode.query), generation=rule)
        # A generated output is decoded after the whole written prompt: no shared prefix then.
        shared = None if rule is not None else self.after_demonstrations(learner, episode.support, episode.query)
        if shared is not None:
            after = learner.evaluation_metrics(shared[0], prefixes=shared[1])
        else:
            query, _ = self.conditioned(learner, episode.support, episode.query)
            after = learner.evaluation_metrics(query, generation=rule)
        return {f"{name}_pre": value for name, value in before.items()} | {
            f"{name}_post": value for name, value in after.items()
        }

    def after_demonstrations(
        self, learner: Learner, support: Split, query: Split
    ) -> tuple[dict[str, Tensor], dict[str, Prefix]] | None:
        """The query split's rows (its sequences, options, calibration and channel rows) to be continued after the
        demonstrations, and the demonstrations run once for them (their keys and values: the ``prefixes`` of
        :meth:`CausalLMLearner.evaluation_metrics`, by mask field); ``None`` where that is not exact (a row would
        drop a demonstration; fewer than two demonstration tokens; an FSDP-sharded model, whose ranks must run the
        same forwards whatever their episodes' lengths) or ``encode_demonstrations_once`` is off.

        Each row is led by the last demonstration token (the prefix holds the others), so that its outputs
        predict the row's first token as in the sequence written out. The demonstrations are :meth:`conditioned`'s:
        :meth:`loss_rows`' for the sequences, the support's for the options and calibration rows, its channel
        sequences for the channel rows. One host sync.
        """
        if not self.encode_demonstrations_once or not isinstance(learner, CausalLMLearner):
            return None
        from torch.distributed.tensor import DTensor

        if any(isinstance(weight, DTensor) for weight in learner.parameters()):
            return None
        if DEMONSTRATION_FIELDS[0] in support:  # BIG-bench's layout puts each row's task prefix first: conditioned
            return None
        query_rows = self.loss_rows(query)
        # By mask field: the rows' fields, their demonstrations, and the mask of the rows they must fit beside (the
        # longest option, for the options and calibration rows, as conditioned chooses their demonstrations).
        rows = {
            "attention_mask": (("input_ids", "attention_mask", "labels"), self.direction, query_rows["attention_mask"])
        }
        if CHOICE_FIELDS[0] in query:
            rows[CHOICE_FIELDS[1]] = (CHOICE_FIELDS, "direct", query[CHOICE_FIELDS[1]])
            if CALIBRATION_FIELDS[0] in query:
                rows[CALIBRATION_FIELDS[1]] = (CALIBRATION_FIELDS, "direct", query[CHOICE_FIELDS[1]])
            if CHANNEL_FIELDS[0] in query:
                rows[CHANNEL_FIELDS[1]] = (CHANNEL_FIELDS, "channel", query[CHANNEL_FIELDS[1]])
        directions = {direction for _, direction, _ in rows.values()}
        demonstrations = {
            direction: channel_sequences(support, "Scoring in context") if direction == "channel" else support
            for direction in directions
        }
        # Nothing is dropped when all the demonstrations fit beside the longest row of each kind.
        lengths = {direction: split["attention_mask"].sum() for direction, split in demonstrations.items()}
        needed = [lengths[direction] + fit.sum(-1).max() for _, direction, fit in rows.values()]
        longest, shortest = torch.stack([torch.stack(needed).max(), torch.stack(list(lengths.values())).min()]).tolist()
        if longest > self.context_length(learner) or shortest < 2:
            return None
        prefixes, last = {}, {}
        for direction, split in demonstrations.items():
            tokens = split["input_ids"][split["attention_mask"].bool()]
            prefixes[direction], last[direction] = learner.encode_prefix(tokens[:-1]), tokens[-1:]
        built = dict(query) | {name: query_rows[name] for name in ("input_ids", "attention_mask", "labels")}
        for fields, direction, _ in rows.values():
            ids, attention, labels = (built[name] for name in fields)
            lead = last[direction].expand(ids.shape[:-1] + (1,))
            built |= dict(
                zip(
                    fields,
                    (
                        torch.cat([lead, ids], -1),
                        F.pad(attention, (1, 0), value=1),
                        F.pad(labels, (1, 0), value=IGNORE_INDEX),
                    ),
                    strict=True,
                )
            )
        return built, {mask: prefixes[direction] for mask, (_, direction, _) in rows.items()}

    def predict(self, learner: Learner, episode: Episode, steps: int | None = None) -> Tensor:
        """Logits of the query examples conditioned on the support (positions of the built sequences)."""
        query, _ = self.conditioned(learner, episode.support, episode.query, options=False)
        with torch.no_grad():
            return learner.predict(query)


def _check_output_labels(batch: TaskBatch) -> None:
    """Refuses splits without ``labels``: MetaICL reads (input, output) examples."""
    for name, split in (("support", batch.support), ("query", batch.query)):
        if "labels" not in split:
            raise ValueError(
                f"MetaICL reads (input, output) examples, but the batch's {name} has no 'labels' (which tokens "
                f"are the output; its fields: {sorted(split)}): blocks of running text, as "
                "LanguageModelingTasksDataModule gives, have none. Use TextToTextTasksDataModule, or FOMAML or "
                "Reptile on text blocks."
            )


def _option_rows(
    support: Split,
    query: Split,
    fields: tuple[str, str, str],
    fit_fields: tuple[str, str, str],
    context: int,
    lead_lengths: Tensor | None = None,
) -> dict[str, Tensor]:
    """The ``fields`` option rows of ``query`` ``(examples, options, tokens)``, each after the demonstrations of
    ``support`` that fit beside its example's longest ``fit_fields`` row (every row of an example shares them), as
    long as the longest such sequence (rounded up to a multiple of 8); ``lead_lengths`` ``(examples,)``: see
    :func:`with_demonstrations`. One host sync."""
    ids, mask, labels = (query[name] for name in fields)
    examples, count, _ = ids.shape
    longest = query[fit_fields[1]].sum(-1).amax(-1, keepdim=True).expand(examples, count).flatten()
    kept, _ = demonstrations_kept(support["attention_mask"], longest, context)
    real = (kept * support["attention_mask"].sum(-1)).sum(-1) + mask.sum(-1).flatten()
    lead = None if lead_lengths is None else lead_lengths[:, None].expand(examples, count).flatten()
    rows, _ = with_demonstrations(
        support,
        ids.flatten(0, 1),
        mask.flatten(0, 1),
        labels.flatten(0, 1),
        context,
        padded_length(int(real.max())),
        longest,
        lead_lengths=lead,
    )
    return {name: tensor.view(examples, count, -1) for name, tensor in zip(fields, rows, strict=True)}


def demonstrations_kept(support_mask: Tensor, query_lengths: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Which demonstrations each query keeps ``(..., queries, shots)``, and its sequence's real length.

    ``support_mask`` is ``(..., shots, tokens)``, ``query_lengths`` ``(..., queries)``, with the
    same leading (episode) dimensions. Demonstration j is kept when it and every later one fit
    beside the query in ``context`` tokens.
    """
    demonstration_lengths = support_mask.sum(-1)
    from_the_end = demonstration_lengths.flip(-1).cumsum(-1).flip(-1)
    kept = from_the_end[..., None, :] + query_lengths[..., :, None] <= context
    return kept, (kept * demonstration_lengths[..., None, :]).sum(-1) + query_lengths


def with_demonstrations(
    support: Split,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    context: int,
    length: int,
    fit_lengths: Tensor | None = None,
    demonstration_labels: bool = False,
    lead_lengths: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Each query sequence preceded by the support's sequences: ``(ids, mask, labels)`` and dropped counts.

    ``support`` holds ``input_ids`` and ``attention_mask`` ``(shots, tokens)``; the query tensors
    are ``(queries, tokens)``, right-padded. Each output row is the support's real tokens in
    order, then the query's, then padding, ``length`` tokens long (at least the longest real
    row); labels only on the query's labelled tokens (with ``demonstration_labels`` also on the kept
    demonstrations' labelled tokens, the support's ``labels``). Demonstrations that would overflow
    ``context`` beside a query of ``fit_lengths`` tokens (default: the query's own length) are
    dropped from the front. ``lead_lengths`` ``(queries,)``: how many of each query's first tokens go before the
    demonstrations instead (BIG-bench's task prefix, written once ahead of them). Runs on the device without host
    syncs.
    """
    demo_ids, demo_mask = support["input_ids"], support["attention_mask"].bool()
    shots, demo_tokens = demo_ids.shape
    queries = input_ids.shape[0]
    query_mask = attention_mask.bool()
    kept, _ = demonstrations_kept(demo_mask, query_mask.sum(1) if fit_lengths is None else fit_lengths, context)
    token_kept = torch.cat([(demo_mask[None] & kept[:, :, None]).flatten(1), query_mask], 1)
    ids = torch.cat([demo_ids.flatten()[None].expand(queries, -1), input_ids], 1)
    if demonstration_labels:
        demo_labels = support["labels"].flatten()[None].expand(queries, -1).to(labels.dtype)
    else:
        demo_labels = torch.full((queries, shots * demo_tokens), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    all_labels = torch.cat([demo_labels, labels], 1).masked_fill(~token_kept, IGNORE_INDEX)
    if length > ids.shape[1]:  # rounding up may ask for more positions than the inputs have
        extra = length - ids.shape[1]
        token_kept, ids = F.pad(token_kept, (0, extra)), F.pad(ids, (0, extra))
        all_labels = F.pad(all_labels, (0, extra), value=IGNORE_INDEX)
    # A stable sort on "dropped" moves the kept tokens to the front, in order; a query's leading tokens go first.
    rank = (~token_kept).to(torch.uint8)
    if lead_lengths is not None:
        position = torch.arange(token_kept.shape[1], device=token_kept.device) - shots * demo_tokens
        leading = (position >= 0) & (position[None] < lead_lengths[:, None])
        rank = torch.where(token_kept, (~leading).to(torch.uint8), 2)
    order = torch.argsort(rank, dim=1, stable=True)[:, :length]
    mask = token_kept.gather(1, order)
    built_ids = ids.gather(1, order).masked_fill(~mask, 0)
    return (built_ids, mask.to(attention_mask.dtype), all_labels.gather(1, order)), (~kept).sum(1)
