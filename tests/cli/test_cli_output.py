"""What `lightning-meta fit` prints: only lines a user needs, the first ones once each; `--version`."""

from __future__ import annotations

import json
import re
import subprocess

from test_cli import run

import lightning_meta

#: Every line a short quick-start `fit` may print (stdout and stderr, progress bars split at \r).
EXPECTED = [
    r"Seed set to 0",
    r"lightning-meta \S+: fit with FOMAML\(inner_lr=0\.1, inner_steps=2, eval_inner_steps=5\)",
    r"learner: CausalLMLearner over GPT2LMHeadModel \(\d\.\d\dM parameters\); fast weights 'all': \d+ tensors, .*",
    r"data: LanguageModelingTasksDataModule\(tokenizer=embedded-bpe-4096, shots=4, queries=4, meta_batch_size=4, "
    r"num_val_tasks=2, num_test_tasks=2\)",
    r"device: cpu x 1 per node x 1 node, strategy SingleDeviceStrategy, precision 32-true; torch threads: 1 .*",
    r"LM tasks: 20 training domains; validation \[.*\]; test \[.*\]\.",
    r"`Trainer\.fit` stopped: `max_steps=4` reached\.",
    r"Post-adaptation results \(mean ± 95% CI over episodes, or over tasks where episodes share them\):",
    r"test/query_loss_(pre|post) = \d+\.\d+ ± \d+\.\d+ \(2 episodes, (1 task|2 tasks)\)",  # a task: a domain
    r"Saved the results to .*results\.json",
    # the progress bars (tqdm); not Lightning's test table, which repeated the figures above as 15-digit floats
    r"(Sanity Checking|Training|Validation|Testing)( DataLoader 0)?: .*",
    r"Meta-training: +\d+%\|.*\| [0-4]/4 .*",
]
HEADER = EXPECTED[1:6]


def test_a_short_fit_prints_only_the_expected_lines(tmp_path):
    result = run(
        "fit",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=2",
        "--data.init_args.num_val_tasks=2",
        "--data.init_args.num_test_tasks=2",
        f"--trainer.default_root_dir={tmp_path}",
        cwd=tmp_path,
    )
    output = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", result.stdout + result.stderr)
    lines = [line.strip() for line in re.split(r"[\r\n]", output) if line.strip()]
    unexpected = [line for line in lines if not any(re.fullmatch(pattern, line) for pattern in EXPECTED)]
    assert not unexpected, "\n".join(unexpected)
    for pattern in HEADER:
        assert sum(bool(re.fullmatch(pattern, line)) for line in lines) == 1, pattern
    # the bar shows the MAML family's support figures on logging steps, and steps out of max_steps
    assert re.search(r"Meta-training: 100%\|.*\| 4/4 .*query_loss=.*support_loss_pre=.*support_loss_post=", output)

    (version,) = tmp_path.glob("lightning_logs/version_*")
    assert list(version.glob("events.out.tfevents.*")), "TensorBoard is the default logger"
    results = json.loads((version / "results.json").read_text())
    assert results["metrics"]["test/query_loss_post"]["episodes"] == 2
    printed = re.search(r"test/query_loss_post = (\d+\.\d+)", output).group(1)
    assert f"{results['metrics']['test/query_loss_post']['mean']:.4f}" == printed


def test_version(tmp_path):
    result = subprocess.run(["lightning-meta", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == f"lightning-meta {lightning_meta.__version__}\n"
