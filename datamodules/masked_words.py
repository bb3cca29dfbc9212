"""Self-supervised meta-learning tasks from unlabeled text: Subset Masked Language Modelling Tasks.

After Bansal, Jha, Munkhdalai & McCallum, "Self-Supervised Meta-Learning for Few-Shot Natural
Language Classification Tasks", EMNLP 2020 (SMLMT).
"""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING

import torch

from lightning_meta.datamodules.episodic_classification import EpisodicClassificationDataModule
from lightning_meta.datamodules.language_modeling import read_corpus

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z]{3,}")
#: Text put where the word was when the tokenizer has no mask token (causal LMs).
PLACEHOLDER = "___"


class MaskedWordTasksDataModule(EpisodicClassificationDataModule):
    """N-way K-shot "which word was masked?" episodes built from unlabeled text.

    The text is cut into sentences. An episode picks ``ways`` words; for each, ``shots`` support
    and ``queries`` query sentences that contain it, with every occurrence of the word (and of any
    longer word containing it: ``return`` also hides ``returns``) replaced by the tokenizer's mask
    token, or by ``___`` for tokenizers without one; words far before the first mask are dropped so
    that truncation to ``max_length`` keeps it. The label is which of the N words was masked.
    Words are split into disjoint train/val/test vocabularies. Training episodes draw words with
    probability ∝ count^``word_sampling_power``: 0 is uniform over the vocabulary, 1 follows the
    corpus frequency (common words dominate), the default 0.5 sits between.

    Works with encoders (mask token; ``EncoderLearner`` + ProtoNet or MAML with a head) and with
    causal LMs as the backbone of a prototype head (``EncoderLearner`` over a GPT-2 config,
    mean-pooled hidden states).

    Args:
        corpus: ``None`` for the embedded prose (the language reference and the standard
            library's docstrings), or a folder / table as in ``LanguageModelingTasksDataModule``.
        text_column: the text column of a table corpus.
        min_sentence_words, max_sentence_words: sentence lengths kept.
        max_word_frequency: leave out words in more than this fraction of sentences (stop words).
        max_words: keep at most this many candidate words (the most frequent eligible ones).
        max_sentences_per_word: sentences kept per word (a seeded choice), bounding the data size.
        word_sampling_power: the exponent of the training word-sampling distribution.
        others: ``tokenizer``, ``max_length``, ``ways``, ``shots``, ``queries``, ``meta_batch_size``,
            ``batches_per_epoch``, ``num_eval_episodes``, ``num_val_tasks``, ``num_test_tasks``,
            ``eval_meta_batch_size``, ``class_split``, ``seed``, ``num_workers``, ``allow_data_change``: as in
            :class:`EpisodicClassificationDataModule`.
    """

    def __init__(
        self,
        corpus: str | None = None,
        text_column: str = "text",
        tokenizer: str = "embedded-wordpiece-4096",
        max_length: int = 48,
        ways: int = 4,
        shots: int = 4,
        queries: int = 4,
        min_sentence_words: int = 6,
        max_sentence_words: int = 40,
        max_word_frequency: float = 0.02,
        max_words: int = 1500,
        max_sentences_per_word: int = 40,
        word_sampling_power: float = 0.5,
        meta_batch_size: int = 4,
        batches_per_epoch: int = 100,
        num_eval_episodes: int = 200,
        num_val_tasks: int | None = None,
        num_test_tasks: int | None = None,
        eval_meta_batch_size: int | None = None,
        class_split: tuple[float, float, float] = (0.6, 0.2, 0.2),
        seed: int = 0,
        num_workers: int = 0,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__(
            text_column="text",
            label_column="word",
            tokenizer=tokenizer,
            max_length=max_length,
            ways=ways,
            shots=shots,
            queries=queries,
            meta_batch_size=meta_batch_size,
            batches_per_epoch=batches_per_epoch,
            num_eval_episodes=num_eval_episodes,
            num_val_tasks=num_val_tasks,
            num_test_tasks=num_test_tasks,
            eval_meta_batch_size=eval_meta_batch_size,
            class_split=class_split,
            seed=seed,
            num_workers=num_workers,
            allow_data_change=allow_data_change,
        )
        if not 0 < max_word_frequency <= 1:
            raise ValueError(f"max_word_frequency must be in (0, 1], got {max_word_frequency}.")
        if min_sentence_words < 1 or max_sentence_words < min_sentence_words:
            raise ValueError(
                f"Need 1 <= min_sentence_words <= max_sentence_words, got {min_sentence_words}, {max_sentence_words}."
            )
        self.corpus = corpus
        self.corpus_text_column = text_column
        self.min_sentence_words = min_sentence_words
        self.max_sentence_words = max_sentence_words
        self.max_word_frequency = max_word_frequency
        self.max_words = max_words
        self.max_sentences_per_word = max_sentences_per_word
        self.word_sampling_power = word_sampling_power
        self.word_counts: dict[str, int] = {}

    def sentences(self) -> list[str]:
        """The corpus cut into sentences of the allowed length."""
        if self.corpus is None:
            from lightning_meta.data.corpus import domain_text

            documents = [domain_text("reference"), domain_text("docstrings")]
        else:
            documents = [d for docs in read_corpus(self.corpus, self.corpus_text_column).values() for d in docs]
        kept = []
        for document in documents:
            for sentence in _SENTENCE_END.split(document):
                sentence = " ".join(sentence.split())
                if self.min_sentence_words <= len(sentence.split()) <= self.max_sentence_words:
                    kept.append(sentence)
        return sorted(set(kept))

    def load_dataset(self) -> Dataset:
        """One row per (word, sentence containing it): the sentence with the word masked, and the word."""
        from datasets import Dataset

        sentences = self.sentences()
        containing: dict[str, list[int]] = collections.defaultdict(list)
        for index, sentence in enumerate(sentences):
            for word in {w.lower() for w in _WORD.findall(sentence)}:
                containing[word].append(index)
        needed = self.shots + self.queries
        limit = self.max_word_frequency * len(sentences)
        eligible = sorted(
            (w for w, rows in containing.items() if needed <= len(rows) <= limit),
            key=lambda w: (-len(containing[w]), w),
        )[: self.max_words]
        if len(eligible) < 3 * self.ways:
            raise ValueError(
                f"Only {len(eligible)} words occur in at least shots + queries = {needed} sentences (and in at most "
                f"{self.max_word_frequency:.0%} of them); need several times ways={self.ways}. Give a larger corpus, "
                "or lower shots/queries."
            )
        tokenizer = self.load_tokenizer()
        mask = tokenizer.mask_token or PLACEHOLDER
        generator = torch.Generator().manual_seed(self.seed)
        texts, words = [], []
        for word in sorted(eligible):
            rows = containing[word]
            keep = torch.randperm(len(rows), generator=generator)[: self.max_sentences_per_word].sort().values
            for row in keep.tolist():
                texts.append(mask_word(sentences[rows[row]], word, mask))
                words.append(word)
        self.word_counts = {word: len(containing[word]) for word in eligible}
        texts = _keep_mask_in_reach(texts, mask, tokenizer, self.max_length)
        return Dataset.from_dict({"text": texts, "word": words})

    def choose_classes(self, generator: torch.Generator, split: str) -> list[int]:
        """``ways`` distinct words, drawn with probability ∝ count^``word_sampling_power``."""
        classes = self.split_classes[split]
        counts = torch.tensor([self.word_counts[self.class_names[c]] for c in classes], dtype=torch.float64)
        weights = counts.pow(self.word_sampling_power)
        picked = torch.multinomial(weights, self.ways, replacement=False, generator=generator)
        return [classes[i] for i in picked.tolist()]


def _keep_mask_in_reach(texts: list[str], mask: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[str]:
    """Cut text before the first mask where its token would fall past ``max_length // 2``, so that
    truncating to ``max_length`` tokens keeps it (and some context after it)."""
    budget = max_length // 2
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    kept = []
    for text, offsets in zip(texts, encoded["offset_mapping"], strict=True):
        start = text.index(mask)
        position = next(i for i, (_, end) in enumerate(offsets) if end > start)
        kept.append(text if position < budget else text[offsets[position - budget + 1][0] :].lstrip())
    return kept


def mask_word(sentence: str, word: str, mask: str) -> str:
    """``sentence`` with every word containing ``word`` (any case) replaced by ``mask``."""
    return re.sub(rf"\w*{re.escape(word)}\w*", mask, sentence, flags=re.IGNORECASE)
