#!/usr/bin/env bash
# GPU checks for issue 8, one PASS/FAIL line per case, at most ~8 minutes on one GPU, nothing to install
# beyond the package's own dependencies (run from the repository root after `pip install -e .`):
#   bash benchmarks/gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=4 PYTHONWARNINGS=ignore
root=$(mktemp -d)
quick=(--trainer.accelerator=gpu --trainer.devices=1 --trainer.max_steps=20 --trainer.val_check_interval=10
       --trainer.enable_progress_bar=false --data.init_args.num_val_tasks=8 --data.init_args.num_test_tasks=8)

check() {  # name, expected exit status, command...
  local name=$1 expected=$2; shift 2
  local log="$root/$name.log"
  timeout 300 "$@" >"$log" 2>&1
  local status=$?
  if [[ $status == "$expected" ]]; then echo "PASS $name"; else echo "FAIL $name (exit $status, see $log)"; tail -5 "$log"; fi
}

check bf16-mixed 0 lightning-meta fit --config configs/quickstart.yaml "${quick[@]}" --trainer.precision=bf16-mixed \
  --trainer.default_root_dir="$root/bf16"
# float16 inner-loop gradients are not loss-scaled: refused at setup with the alternative named (exit 2).
check 16-mixed-refused 2 lightning-meta fit --config configs/quickstart.yaml "${quick[@]}" --trainer.precision=16-mixed \
  --trainer.default_root_dir="$root/fp16"
check 16-mixed-protonet 0 lightning-meta fit --config configs/text_protonet.yaml "${quick[@]}" \
  --trainer.precision=16-mixed --trainer.default_root_dir="$root/fp16-protonet"
# Lightning's FSDPStrategy (FSDP1) is refused (it would shard fast weights); FSDP2 on one device runs.
check fsdp1-refused 2 lightning-meta fit --config configs/quickstart.yaml "${quick[@]}" --trainer.strategy=fsdp \
  --trainer.default_root_dir="$root/fsdp1"
check fsdp2-one-device 0 lightning-meta fit --config configs/lm_fomaml_fsdp.yaml "${quick[@]}" \
  --trainer.default_root_dir="$root/fsdp2"
# Second-order MAML memory, meta-batch 1/4/16, GPT-2-small-like width on the GPU.
check memory 0 python benchmarks/memory/run.py --gpu --n-layer 12 --n-embd 768 --n-head 12
cat "$root/memory.log"
