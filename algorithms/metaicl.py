"""MetaICL: meta-training a causal LM to learn from in-context demonstrations."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_meta.algorithms.base import MetaAlgorithm
from lightning_meta.learners import FastWeights, Learner
from lightning_meta.tasks import ANSWER, CHOICE_FIELDS, IGNORE_INDEX, Episode, Split


class MetaICL(MetaAlgorithm):
    """Min, Lewis, Zettlemoyer & Hajishirzi, "MetaICL: Learning to Learn In Context", NAACL 2022.

    No inner loop. Each query example is preceded, in one sequence, by the task's support
    examples (the demonstrations, in their episode order); the loss is the query's output
    tokens' cross-entropy, so training is ordinary LM training on in-context episodes. Adapting
    to a task at evaluation is conditioning on its support: ``*_pre`` figures are zero-shot (the
    query alone), ``*_post`` figures K-shot.

    The sequences respect the context: when the demonstrations and the query do not fit in
    ``max_length`` tokens (by default the model's context), the demonstrations farthest from
    the query are dropped, whole, never the query. ``train/dropped_demonstrations`` logs how
    many were dropped per query on average (0 when everything fits). Works with any causal-LM
    learner whose splits hold ``input_ids``, ``attention_mask`` and ``labels`` on the output
    tokens (:class:`~lightning_meta.datamodules.TextToTextTasksDataModule`); the demonstrations
    keep their own tokens (output included, end token as separator) and carry no loss.

    Args:
        max_length: longest sequence, in tokens; ``None``: the learner's context
            (``max_position_embeddings``).

    Example::

        from lightning_meta.algorithms import MetaICL
        metaicl = MetaICL()
        metaicl.meta_loss(learner, task_batch).loss.backward()   # loss on the query outputs
        figures = metaicl.evaluate(learner, episode)              # zero-shot (_pre), K-shot (_post)
    """

    adapts_weights = False

    def __init__(self, max_length: int | None = None) -> None:
        super().__init__()
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens or None (the model's context), got {max_length}.")
        self.max_length = max_length

    def check_learner(self, learner: Learner) -> None:
        if learner.task_type != "language_modeling":
            raise ValueError(
                f"MetaICL conditions a causal LM on demonstrations; {type(learner).__name__} is a "
                f"{learner.task_type} learner. Use CausalLMLearner with TextToTextTasksDataModule."
            )

    def context_length(self, learner: Learner) -> int:
        """Tokens a sequence may hold: ``max_length``, at most the model's context."""
        model_context = getattr(getattr(learner, "transformer", None), "config", None)
        model_context = getattr(model_context, "max_position_embeddings", None)
        limits = [limit for limit in (self.max_length, model_context) if limit is not None]
        if not limits:
            raise ValueError(
                f"MetaICL cannot tell the context length of {type(learner).__name__}: set max_length "
                "(--model.algorithm.init_args.max_length=...)."
            )
        return min(limits)

    def conditioned(
        self, learner: Learner, support: Split, query: Split, options: bool = True
    ) -> tuple[dict[str, Tensor], Tensor]:
        """The query split with the support as demonstrations, and the demonstrations dropped per query.

        With ``options``, option fields (:data:`~lightning_meta.language_models.CHOICE_FIELDS`) get
        the same demonstrations, so that options are scored in context.
        """
        context = self.context_length(learner)
        example_length = query["input_ids"].shape[-1]
        if example_length > context:
            raise ValueError(
                f"Query examples are {example_length} tokens long (the datamodule's max_length) but MetaICL's context "
                f"is {context} tokens: the query alone would not fit. Lower the datamodule's max_length to {context} "
                "or less."
            )
        conditioned, dropped = with_demonstrations(support, query["input_ids"], query["attention_mask"],
                                                   query["labels"], context)  # fmt: skip
        built = dict(zip(("input_ids", "attention_mask", "labels"), conditioned, strict=True))
        if options and CHOICE_FIELDS[0] in query:
            ids, mask, labels = (query[name] for name in CHOICE_FIELDS)
            examples, options, _ = ids.shape
            choices, _ = with_demonstrations(support, ids.flatten(0, 1), mask.flatten(0, 1), labels.flatten(0, 1),
                                             context)  # fmt: skip
            built |= {
                name: tensor.view(examples, options, -1) for name, tensor in zip(CHOICE_FIELDS, choices, strict=True)
            }
            built[ANSWER] = query[ANSWER]
        return built, dropped

    def task_loss(self, learner: Learner, episode: Episode) -> tuple[Tensor, dict[str, Tensor]]:
        query, dropped = self.conditioned(learner, episode.support, episode.query, options=False)
        loss, metrics = learner.loss(query)
        figures = {f"query_{name}": value for name, value in metrics.items()}
        return loss, figures | {"dropped_demonstrations": dropped.float().mean()}

    def adapt(self, learner: Learner, support: Split, steps: int | None = None) -> FastWeights:
        """MetaICL adapts by conditioning, not by changing weights: the learner's fast weights, unchanged."""
        return {name: weight.detach() for name, weight in learner.fast_parameters().items()}

    def evaluate(self, learner: Learner, episode: Episode, steps: int | None = None) -> dict[str, Tensor]:
        """Query figures zero-shot (``*_pre``) and conditioned on the support (``*_post``)."""
        self.check_learner(learner)
        before = learner.evaluation_metrics(episode.query)
        query, _ = self.conditioned(learner, episode.support, episode.query)
        after = learner.evaluation_metrics(query)
        return {f"{name}_pre": value for name, value in before.items()} | {
            f"{name}_post": value for name, value in after.items()
        }

    def predict(self, learner: Learner, episode: Episode, steps: int | None = None) -> Tensor:
        """Logits of the query examples conditioned on the support (positions of the built sequences)."""
        query, _ = self.conditioned(learner, episode.support, episode.query, options=False)
        with torch.no_grad():
            return learner.predict(query)


def with_demonstrations(
    support: Split, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, context: int
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Each query sequence preceded by the support's sequences: ``(ids, mask, labels)`` and dropped counts.

    ``support`` holds ``input_ids`` and ``attention_mask`` ``(shots, tokens)``; the query tensors
    are ``(queries, tokens)``, right-padded. Each output row is the support's real tokens in
    order, then the query's, then padding, ``min(context, (shots + 1) * tokens)`` long; labels
    only on the query's labelled tokens. Demonstrations that would overflow ``context`` are
    dropped from the front. Runs on the device without host syncs (sizes come from shapes).
    """
    demo_ids, demo_mask = support["input_ids"], support["attention_mask"].bool()
    shots, demo_tokens = demo_ids.shape
    queries = input_ids.shape[0]
    query_mask = attention_mask.bool()
    # Demonstration j is kept for query i when it and every later one fit beside the query.
    from_the_end = demo_mask.sum(1).flip(0).cumsum(0).flip(0)
    kept = from_the_end[None, :] + query_mask.sum(1)[:, None] <= context
    token_kept = torch.cat([(demo_mask[None] & kept[:, :, None]).flatten(1), query_mask], 1)
    ids = torch.cat([demo_ids.flatten()[None].expand(queries, -1), input_ids], 1)
    ignored = torch.full((queries, shots * demo_tokens), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    all_labels = torch.cat([ignored, labels], 1).masked_fill(~token_kept, IGNORE_INDEX)
    # A stable sort on "dropped" moves the kept tokens to the front, in order.
    order = torch.argsort((~token_kept).to(torch.uint8), dim=1, stable=True)[:, : min(context, ids.shape[1])]
    mask = token_kept.gather(1, order)
    built_ids = ids.gather(1, order).masked_fill(~mask, 0)
    return (built_ids, mask.to(attention_mask.dtype), all_labels.gather(1, order)), (~kept).sum(1)
