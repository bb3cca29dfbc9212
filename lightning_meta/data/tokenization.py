"""Tokenizers for the embedded corpus, shipped or trained locally, so nothing is downloaded.

``load_tokenizer("embedded-bpe-4096")`` gives a GPT-2-style byte-level BPE with 4,096 tokens;
``"embedded-wordpiece-4096"`` a BERT-style WordPiece with ``[MASK]``. These two defaults ship with the
package (``lightning_meta/tokenizer_data/``), so their token ids are the same on every machine and Python
version. Other sizes (``embedded-bpe-N``, ``embedded-wordpiece-N``) are trained on first use from this
Python's standard library, whose text differs between Python versions, and cached; training is
deterministic, so one Python version always gives the same files, byte for byte. Any other value is a local
folder (or ``pkg:NAME``) holding a Hugging Face tokenizer.

:func:`tokenizer_fingerprint` digests everything that decides token ids, for checkpoints to record which
vocabulary they were trained with.

The shipped files were trained on Python 3.11.7. To regenerate them after changing the training recipe::

    python -c "from lightning_meta.data.tokenization import write_shipped_tokenizers; write_shipped_tokenizers()"
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_meta.data.corpus import embedded_domains
from lightning_meta.data.local_files import (
    CACHE_FULL_REMEDY,
    cache_entry,
    dequantized_gguf,
    load_pretrained,
    resolve_local_path,
    write_folder_atomically,
)

_EMBEDDED = re.compile(r"^embedded-(bpe|wordpiece)-(\d+)$")
#: Characters of each domain the embedded tokenizers are trained on (keeps training ~1 s).
TRAINING_CHARS_PER_DOMAIN = 100_000
_VERSION = 2  # bump when the training recipe changes, to invalidate caches (2: deterministic WordPiece)
#: Embedded tokenizers that ship as package data instead of being trained.
SHIPPED_TOKENIZERS: tuple[str, ...] = ("embedded-bpe-4096", "embedded-wordpiece-4096")
_SHIPPED_DIR = Path(__file__).with_name("tokenizer_data")
_WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Supplementary Private Use Area-A: code points no text assigns a meaning to (see _wordpiece).
_PRIVATE_USE, _PRIVATE_USE_SIZE = 0xF0000, 65_534


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """An embedded tokenizer (``embedded-bpe-N``, ``embedded-wordpiece-N``), a local folder, or
    ``pkg:NAME`` (an installed data package; a GGUF file alone in it provides the tokenizer)."""
    if name_or_path in SHIPPED_TOKENIZERS:
        folder = _SHIPPED_DIR / name_or_path
        if not (folder / "tokenizer.json").exists():
            # Training instead would silently give other ids on another Python version.
            raise FileNotFoundError(
                f"The shipped tokenizer {name_or_path!r} is missing from {folder}: reinstall lightning-meta, or "
                "regenerate it with lightning_meta.data.tokenization.write_shipped_tokenizers()."
            )
        return load_pretrained(AutoTokenizer, folder)
    match = _EMBEDDED.match(name_or_path)
    if match is None:
        try:
            path = resolve_local_path(name_or_path)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"Tokenizer {name_or_path!r} is neither an embedded tokenizer (embedded-bpe-4096, "
                f"embedded-wordpiece-4096) nor a local folder or hub id: {error}"
            ) from error
        gguf_files = sorted(path.glob("*.gguf"))
        if not (path / "tokenizer_config.json").exists() and gguf_files:
            path = dequantized_gguf(path, gguf_files[0].name)
        _check_tokenizer_files(path, name_or_path)
        return load_pretrained(AutoTokenizer, path)
    kind, vocab_size = match.group(1), int(match.group(2))
    # The stdlib text, hence the vocabulary, depends on the Python version: part of the cache key.
    version = f"{_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}-{TRAINING_CHARS_PER_DOMAIN}"
    key = hashlib.sha1(f"{kind}-{vocab_size}-{version}".encode()).hexdigest()[:12]
    folder = cache_entry("tokenizers", name_or_path, key)
    if not (folder / "tokenizer.json").exists():
        _train_embedded(kind, vocab_size, folder)
    return load_pretrained(AutoTokenizer, folder)


#: Files one of which a tokenizer folder holds (transformers' fast file, its config, or a slow tokenizer's vocabulary).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _check_tokenizer_files(folder: Path, name: str) -> None:
    """Refuses a folder without tokenizer files. ``AutoTokenizer`` would build a one-token tokenizer that encodes
    every text as nothing from a folder holding only a model's ``config.json``, or fail with a message about
    sentencepiece from an empty one."""
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"Tokenizer {name!r}: the folder {folder} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)}). "
            "Point tokenizer= at the folder that has them (the model's original folder or hub id; an export by "
            "lightning-meta writes them beside the weights), or use an embedded one (embedded-bpe-4096)."
        )


def required_tokenizer(tokenizer: str | None, owner: str) -> str:
    """``tokenizer``, or an error naming ``owner``'s option when it is unset.

    Data options default to ``None`` so that the ``lightning-meta`` command can give the data the
    model's tokenizer; from Python, the caller names it.
    """
    if tokenizer is None:
        raise ValueError(
            f"{owner} needs tokenizer=: the one the model reads (embedded-bpe-4096 ships with the package; or a "
            "tokenizer folder, pkg:NAME/dir or a cached hub id). The lightning-meta command sets it from the "
            "model's when the config leaves it out."
        )
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """16 hex digits of sha256 over what decides token ids: the vocabulary (added tokens included) and,
    for fast tokenizers, the normalizer, pre-tokenizer, model (type, vocabulary, merges, options),
    post-processor and added-token settings. Decoding, padding and truncation are left out."""
    state: dict[str, object] = {"vocab": tokenizer.get_vocab()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        config = json.loads(backend.to_str())
        state.update({key: config.get(key) for key in ("normalizer", "pre_tokenizer", "model", "post_processor")})
        state["added_tokens"] = config.get("added_tokens")
    else:  # a slow tokenizer: its class stands in for the rules that split text
        state["class"] = type(tokenizer).__name__
    canonical = json.dumps(state, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@functools.cache
def fingerprint_of(name_or_path: str) -> str:
    """:func:`tokenizer_fingerprint` of :func:`load_tokenizer(name_or_path) <load_tokenizer>`, memoised per
    name for the life of the process (a folder changed meanwhile is not re-read)."""
    return tokenizer_fingerprint(load_tokenizer(name_or_path))


def check_tokenizer(trained_with: str, fingerprint: str, tokenizer: str, who: str) -> None:
    """Raise unless ``tokenizer`` gives the token ids ``who`` was trained with: those of ``trained_with``,
    recorded as ``fingerprint``."""
    found = fingerprint_of(tokenizer)
    if found != fingerprint:
        raise ValueError(
            f"{who} was trained with tokenizer {trained_with!r} (fingerprint {fingerprint}), but tokenizer "
            f"{tokenizer!r} here has fingerprint {found}: other token ids, so the model would read garbled text. "
            "Give the tokenizer folder it was trained with (save_pretrained a copy next to the checkpoint), or "
            "train the embedded tokenizer on the same Python version."
        )


def tokenizer_record(tokenizer: str) -> dict[str, str]:
    """What a checkpoint records of the tokenizer its model or data used: the name and its fingerprint."""
    return {"tokenizer": tokenizer, "tokenizer_fingerprint": fingerprint_of(tokenizer)}


def check_data_tokenizer(model_tokenizer: str, data_tokenizer: str) -> None:
    """Raise unless the data's tokenizer gives the model's token ids (compared by fingerprint when the names
    differ): ids of another vocabulary that happen to fall inside the model's would train on garbled text."""
    if data_tokenizer == model_tokenizer:
        return
    model, data = fingerprint_of(model_tokenizer), fingerprint_of(data_tokenizer)
    if model != data:
        raise ValueError(
            f"The model reads the token ids of tokenizer {model_tokenizer!r} (fingerprint {model}), but the data is "
            f"tokenized with {data_tokenizer!r} (fingerprint {data}): the model would read garbled text. Give the "
            f"data the model's tokenizer (--data.init_args.tokenizer={model_tokenizer}; the lightning-meta command "
            "gives it the model's when the config leaves it out)."
        )


def check_tokenizer_record(record: Mapping[str, Any], tokenizer: str, who: str) -> None:
    """:func:`check_tokenizer` against a checkpoint's :func:`tokenizer_record` (nothing to check without one)."""
    if "tokenizer_fingerprint" in record:
        check_tokenizer(record["tokenizer"], record["tokenizer_fingerprint"], tokenizer, who)


def write_shipped_tokenizers(folder: Path | str = _SHIPPED_DIR) -> None:
    """Train :data:`SHIPPED_TOKENIZERS` from this Python's standard library into ``folder/<name>/``
    (by default the package's own ``tokenizer_data``, replacing the shipped files)."""
    for name in SHIPPED_TOKENIZERS:
        kind, vocab_size = _EMBEDDED.match(name).groups()
        target = Path(folder) / name
        shutil.rmtree(target, ignore_errors=True)
        _train_embedded(kind, int(vocab_size), target)
        target.chmod(0o755)  # staged in a private temporary folder; package data must be readable by all


def _train_embedded(kind: str, vocab_size: int, folder: Path) -> None:
    if vocab_size < 300:
        raise ValueError(
            f"embedded-{kind}-{vocab_size}: vocabulary size must be >= 300 (bytes and special tokens), "
            f"got {vocab_size}."
        )
    texts = [text[:TRAINING_CHARS_PER_DOMAIN] for _, text in sorted(embedded_domains().items())]
    tokenizer = _byte_level_bpe(texts, vocab_size) if kind == "bpe" else _wordpiece(texts, vocab_size)

    def save(staging: Path) -> None:
        tokenizer.save_pretrained(staging)

    write_folder_atomically(folder, save, what="the trained tokenizer", remedy=CACHE_FULL_REMEDY)


def _byte_level_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE. Deterministic as is: every id comes from the sorted byte alphabet or
    from a merge, and merge-count ties are broken by those ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )


def _wordpiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """BERT-style lowercase WordPiece, trained deterministically.

    ``WordPieceTrainer`` (and ``BpeTrainer`` with a ``continuing_subword_prefix``) numbers the ``##``
    characters in the order of a hash map seeded afresh in every process, and breaks ties between equally
    frequent merges by those numbers, so each run learnt another vocabulary. Here the non-initial characters
    of each word are first swapped for private-use characters, one per character: the trainer then finds
    them all in its sorted alphabet and numbers nothing by hash order. The learnt tokens are swapped back,
    those starting with a private-use character becoming ``##`` continuations, as WordPiece expects.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    alphabet = {char for word in words for char in word}
    continuations = sorted({char for word in words for char in word[1:]})
    if max(alphabet) >= chr(_PRIVATE_USE) or len(continuations) > _PRIVATE_USE_SIZE:
        raise ValueError(
            f"The WordPiece training text uses private-use characters (U+{_PRIVATE_USE:X} and up) or more than "
            f"{_PRIVATE_USE_SIZE} distinct characters; lower TRAINING_CHARS_PER_DOMAIN or clean the corpus."
        )
    marked = {ord(char): chr(_PRIVATE_USE + i) for i, char in enumerate(continuations)}
    unmarked = {_PRIVATE_USE + i: char for i, char in enumerate(continuations)}

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # words never contain whitespace after BERT's splitting
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_WORDPIECE_SPECIALS, show_progress=False)
    bpe.train_from_iterator(
        (" ".join([word[0] + word[1:].translate(marked)] * count) for word, count in words.items()), trainer
    )
    vocab = {
        ("##" if ord(token[0]) in unmarked else "") + token.translate(unmarked): token_id
        for token, token_id in bpe.get_vocab().items()
    }
    if len(vocab) != bpe.get_vocab_size():  # a recipe bug, not user input: two learnt tokens became one
        raise RuntimeError(
            f"WordPiece training merged tokens ({len(vocab)} of {bpe.get_vocab_size()} left); report this with "
            "the tokenizers version."
        )

    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(_WORDPIECE_SPECIALS)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
