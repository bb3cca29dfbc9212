"""Embedded tokenizers are reproducible byte for byte, and fingerprints pin down their token ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_meta.data import tokenization
from lightning_meta.data.tokenization import (
    SHIPPED_TOKENIZERS,
    check_tokenizer,
    fingerprint_of,
    load_tokenizer,
    tokenizer_fingerprint,
    write_shipped_tokenizers,
)

SHIPPED_DIR = Path(tokenization.__file__).with_name("tokenizer_data")
SMALL = ("embedded-wordpiece-512", "embedded-bpe-512")  # not shipped: trained on first use


def _train_in_subprocess(cache: Path, hash_seed: str) -> subprocess.Popen:
    env = {**os.environ, "LIGHTNING_META_CACHE": str(cache), "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    code = (
        f"from lightning_meta.data.tokenization import load_tokenizer\nfor name in {SMALL!r}:\n    load_tokenizer(name)"
    )
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.slow
def test_training_gives_the_same_files_in_separate_processes(tmp_path: Path) -> None:
    # The old WordPieceTrainer numbered tokens in a hash order seeded afresh per process: every run differed.
    caches = [tmp_path / "first", tmp_path / "second"]
    runs = [_train_in_subprocess(cache, seed) for cache, seed in zip(caches, ("1", "2"), strict=True)]
    for run in runs:
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, output.decode()
    for name in SMALL:
        first, second = ([*(cache / "tokenizers").glob(f"{name}-*")] for cache in caches)
        assert len(first) == len(second) == 1
        assert (first[0] / "tokenizer.json").exists()
        assert _files(first[0]) == _files(second[0]), f"{name} differs between two trainings"


def test_shipped_tokenizers_load_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(cache))

    def refuse(*args: object) -> None:
        raise AssertionError("a shipped tokenizer was trained")

    monkeypatch.setattr(tokenization, "_train_embedded", refuse)
    wordpiece, bpe = load_tokenizer("embedded-wordpiece-4096"), load_tokenizer("embedded-bpe-4096")
    assert not cache.exists()

    assert len(wordpiece) == len(bpe) == 4096
    ids = wordpiece("Hello World")["input_ids"]
    assert (ids[0], ids[-1]) == (wordpiece.cls_token_id, wordpiece.sep_token_id)
    assert wordpiece.decode(ids, skip_special_tokens=True) == "hello world"
    assert [wordpiece.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (bpe.bos_token, bpe.eos_token, bpe.unk_token, bpe.pad_token) == ("<|endoftext|>",) * 3 + ("<pad>",)
    assert bpe.decode(bpe("Hello World")["input_ids"]) == "Hello World"


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the shipped tokenizers were trained on Python 3.11")
def test_shipped_tokenizers_equal_freshly_trained_ones(tmp_path: Path) -> None:
    # Catches a training recipe changed without regenerating the shipped files.
    write_shipped_tokenizers(tmp_path)
    for name in SHIPPED_TOKENIZERS:
        assert _files(tmp_path / name) == _files(SHIPPED_DIR / name), (
            f"{name}: the shipped files are stale; regenerate them with write_shipped_tokenizers()"
        )


def test_fingerprint_is_stable_across_loads_and_copies(tmp_path: Path) -> None:
    fingerprints = set()
    for name in SHIPPED_TOKENIZERS:
        copy = shutil.copytree(SHIPPED_DIR / name, tmp_path / name)
        found = {
            tokenizer_fingerprint(load_tokenizer(name)),
            tokenizer_fingerprint(load_tokenizer(name)),
            tokenizer_fingerprint(load_tokenizer(str(copy))),
            tokenizer_fingerprint(AutoTokenizer.from_pretrained(copy)),
            fingerprint_of(name),
        }
        assert len(found) == 1
        (fingerprint,) = found
        assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
        fingerprints.add(fingerprint)
    assert len(fingerprints) == len(SHIPPED_TOKENIZERS)
    hits = fingerprint_of.cache_info().hits
    fingerprint_of(SHIPPED_TOKENIZERS[0])
    assert fingerprint_of.cache_info().hits == hits + 1


def _swap_two_ids(config: dict) -> None:
    vocab = config["model"]["vocab"]
    vocab["the"], vocab["##s"] = vocab["##s"], vocab["the"]


def _no_lowercasing(config: dict) -> None:
    config["normalizer"]["lowercase"] = False


@pytest.mark.parametrize("edit", [_swap_two_ids, _no_lowercasing])
def test_fingerprint_changes_with_the_token_ids(tmp_path: Path, edit) -> None:
    name = "embedded-wordpiece-4096"
    copy = shutil.copytree(SHIPPED_DIR / name, tmp_path / name)
    config = json.loads((copy / "tokenizer.json").read_text(encoding="utf-8"))
    edit(config)
    (copy / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    assert tokenizer_fingerprint(load_tokenizer(str(copy))) != fingerprint_of(name)


def test_check_tokenizer_names_both_fingerprints(tmp_path: Path) -> None:
    wordpiece, bpe = SHIPPED_TOKENIZERS[1], SHIPPED_TOKENIZERS[0]
    check_tokenizer(wordpiece, fingerprint_of(wordpiece), str(SHIPPED_DIR / wordpiece), "the checkpoint")
    with pytest.raises(ValueError, match=f"fingerprint {fingerprint_of(wordpiece)}.*{fingerprint_of(bpe)}"):
        check_tokenizer(wordpiece, fingerprint_of(wordpiece), bpe, "the checkpoint")


def test_too_small_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="embedded-bpe-100: vocabulary size must be >= 300"):
        load_tokenizer("embedded-bpe-100")


@pytest.mark.parametrize("files", [{}, {"config.json": '{"model_type": "gpt2"}'}], ids=["empty", "config_only"])
def test_a_folder_without_tokenizer_files_is_refused_naming_the_fix(tmp_path: Path, files: dict[str, str]) -> None:
    # A model's config alone made AutoTokenizer build a one-token GPT2Tokenizer that encodes every text as [].
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files .*Point tokenizer= at the folder"):
        load_tokenizer(str(tmp_path))


def test_a_folder_with_tokenizer_files_still_loads(tmp_path: Path) -> None:
    shutil.copytree(SHIPPED_DIR / "embedded-bpe-4096", tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')  # as in an exported model's folder
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer_fingerprint(tokenizer) == fingerprint_of("embedded-bpe-4096")
