"""Peak memory of one second-order MAML meta-step against the meta-batch size, task by task vs all at once.

The quick start's tiny GPT-2 (2 layers, width 128, 4,096-token vocabulary, eager attention), LM
tasks from the embedded corpus (4 support + 4 query blocks of 64 tokens), second-order MAML with
2 inner steps on all weights. Each (meta-batch, mode) is measured in a fresh process: after one
warm-up step, the kernel's resident-set high-water mark is reset (``/proc/self/clear_refs``) and
one meta-step (``meta_loss`` + ``backward``) runs; the peak is the high-water mark minus the
resident set before the step. RSS sees the allocator's memory (``tracemalloc`` does not); glibc is
told to return every freed block of 64 KiB or more to the system (``MALLOC_MMAP_THRESHOLD_``), so
the high-water mark is the step's own peak rather than what earlier steps left cached.

    OMP_NUM_THREADS=1 python benchmarks/memory/run.py            # meta-batch 1, 4, 16
    python benchmarks/memory/run.py --gpu --n-layer 12 --n-embd 768 --n-head 12   # GPT-2 small size, CUDA memory
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402


def measure(meta_batch_size: int, meta_batch: str, device: str, size: dict[str, int]) -> float:
    """Peak memory in MiB of one meta-step above what was resident before it."""
    import torch

    from lightning_meta import CausalLMLearner, TaskBatch
    from lightning_meta.algorithms import MAML
    from lightning_meta.datamodules import LanguageModelingTasksDataModule

    torch.manual_seed(0)
    config = {
        "model_type": "gpt2",
        "n_positions": 128,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        **size,
    }
    learner = CausalLMLearner(model_config=config, attn_implementation="eager").to(device)
    data = LanguageModelingTasksDataModule(
        tokenizer="embedded-bpe-4096", block_size=64, shots=4, queries=4, meta_batch_size=meta_batch_size
    )
    data.setup("fit")
    algorithm = MAML(inner_lr=0.1, inner_steps=2)

    def step(index: int) -> None:
        batch = data.train_batch(index)
        batch = TaskBatch(
            support={k: v.to(device) for k, v in batch.support.items()},
            query={k: v.to(device) for k, v in batch.query.items()},
        )
        learner.zero_grad(set_to_none=True)
        algorithm.meta_loss(learner, batch, meta_batch=meta_batch).loss.backward()

    step(0)  # warm-up: gradients allocated, caches filled
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(1)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return common.peak_rss_mib(lambda: step(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--gpu", action="store_true", help="measure on CUDA with torch.cuda.max_memory_allocated")
    parser.add_argument("--n-layer", type=int, default=2, help="12 for a GPT-2-small-sized model")
    parser.add_argument("--n-embd", type=int, default=128, help="768 for a GPT-2-small-sized model")
    parser.add_argument("--n-head", type=int, default=4, help="12 for a GPT-2-small-sized model")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    model_size = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head}
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], device, model_size)))
        return
    peaks: dict[tuple[int, str], float] = {}
    for mode in ("task_by_task", "all_at_once"):
        for size in args.meta_batch_sizes:
            command = [
                sys.executable,
                __file__,
                "--one",
                str(size),
                mode,
                "--n-layer",
                str(args.n_layer),
                "--n-embd",
                str(args.n_embd),
                "--n-head",
                str(args.n_head),
            ] + (["--gpu"] if args.gpu else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True, env=common.MALLOC_ENV).stdout
            peaks[size, mode] = json.loads(output.strip().splitlines()[-1])
    first = args.meta_batch_sizes[0]
    measured = "CUDA allocated" if args.gpu else "RSS"
    print(f"Second-order MAML, GPT-2 {model_size}, peak memory of one meta-step ({measured}):")
    print(f"{'meta-batch':>10} | {'task by task (MiB)':>18} | {'ratio':>5} | {'all at once (MiB)':>17} | {'ratio':>5}")
    for size in args.meta_batch_sizes:
        flat, joint = peaks[size, "task_by_task"], peaks[size, "all_at_once"]
        print(
            f"{size:>10} | {flat:>18.1f} | {flat / peaks[first, 'task_by_task']:>5.2f} | {joint:>17.1f} | "
            f"{joint / peaks[first, 'all_at_once']:>5.2f}"
        )


if __name__ == "__main__":
    main()
