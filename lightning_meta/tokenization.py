"""Tokenizers trained locally on the embedded corpus and cached, so nothing is downloaded.

``load_tokenizer("embedded-bpe-4096")`` gives a GPT-2-style byte-level BPE with 4,096 tokens;
``"embedded-wordpiece-4096"`` a BERT-style WordPiece with ``[MASK]``. Any other value is a local
folder holding a Hugging Face tokenizer (``AutoTokenizer.from_pretrained(path)``).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_meta.corpus import embedded_domains
from lightning_meta.local_files import cache_dir, dequantized_gguf, resolve_local_path, write_folder_atomically

_EMBEDDED = re.compile(r"^embedded-(bpe|wordpiece)-(\d+)$")
#: Characters of each domain the embedded tokenizers are trained on (keeps training ~2 s).
TRAINING_CHARS_PER_DOMAIN = 100_000
_VERSION = 1  # bump when the training recipe changes, to invalidate caches


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """An embedded tokenizer (``embedded-bpe-N``, ``embedded-wordpiece-N``), a local folder, or
    ``pkg:NAME`` (an installed data package; a GGUF file alone in it provides the tokenizer)."""
    match = _EMBEDDED.match(name_or_path)
    if match is None:
        try:
            path = resolve_local_path(name_or_path)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"Tokenizer {name_or_path!r} is neither an embedded tokenizer (embedded-bpe-4096, "
                f"embedded-wordpiece-4096) nor a local folder: {error}"
            ) from error
        gguf_files = sorted(path.glob("*.gguf"))
        if not (path / "tokenizer_config.json").exists() and gguf_files:
            path = dequantized_gguf(path, gguf_files[0].name)
        return AutoTokenizer.from_pretrained(path)
    kind, vocab_size = match.group(1), int(match.group(2))
    if vocab_size < 300:
        raise ValueError(
            f"{name_or_path}: vocabulary size must be >= 300 (bytes and special tokens), got {vocab_size}."
        )
    version = f"{_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}-{TRAINING_CHARS_PER_DOMAIN}"
    key = hashlib.sha1(f"{kind}-{vocab_size}-{version}".encode()).hexdigest()[:12]
    folder = cache_dir() / "tokenizers" / f"{name_or_path}-{key}"
    if not (folder / "tokenizer.json").exists():
        _train_embedded(kind, vocab_size, folder)
    return AutoTokenizer.from_pretrained(folder)


def _train_embedded(kind: str, vocab_size: int, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = [text[:TRAINING_CHARS_PER_DOMAIN] for _, text in sorted(embedded_domains().items())]
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        tokenizer.train_from_iterator(texts, trainer)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            unk_token="<|endoftext|>", pad_token="<pad>",
        )  # fmt: skip
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )  # fmt: skip
    write_folder_atomically(folder, wrapped.save_pretrained)
