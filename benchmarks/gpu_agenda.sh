#!/usr/bin/env bash
# The GPU checks of issue 5. That machine has a CUDA torch but no network and no copy of the bundled corpus,
# so first, here:
#   make gpu-carry            # copies the corpus package (17 MB) into .whl/site, which git ignores
# then name the parts to run, in one call of the device tool or several (each call has a 10-minute limit,
# and a session's device time may be as little as 15 minutes, machine start included, so the targets first):
#   run(command="bash benchmarks/gpu_agenda.sh bench train", carry=[".whl"])  # the targets: step benchmark, trainer
#   run(command="bash benchmarks/gpu_agenda.sh tests", carry=[".whl"])        # tests/test_cuda.py, compiled graphs
# bench: the paper-scale step benchmark; train: 40 steps of the trainer, Wide; tests: whether a pageable copy
# waits there (benchmarks/copy_waits.py), then the CUDA tests.
# Output goes to $OUT (which the device tool brings back), else to benchmarks/results/gpu-<date>/.
set -u
[ $# -gt 0 ] || { echo "name one or more parts: bench, train, tests" >&2; exit 2; }
for part in "$@"; do
  case $part in tests|bench|train) ;; *) echo "unknown part '$part': name bench, train or tests" >&2; exit 2 ;; esac
done
out=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$out"
export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}" MOE_CORE_RUNS=/tmp/moe_runs MOE_CORE_CACHE=/tmp/moe_cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
python -c "import torch; print('torch', torch.__version__)" >> "$out/device.txt" 2>&1

status=0
for part in "$@"; do
  start=$SECONDS
  case $part in
    tests) python benchmarks/copy_waits.py > "$out/copy_waits.txt" 2>&1
           python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
             tests/test_perf.py::test_every_variant_compiles_to_one_graph > "$out/test_cuda.txt" 2>&1 ;;
    bench) python benchmarks/run.py --profile paper --device cuda --compile --variants dense_iso_param wide deep \
             --set train.micro_batches=fused > "$out/bench_fused_b64.txt" 2>&1 ;;
    train) python -m moe_core train --variant wide --profile paper --corpus wiki-vital --steps 40 \
             --set train.eval_batches=12 --no-progress > "$out/train_wide.txt" 2>&1 &&
           cp "$MOE_CORE_RUNS"/wide_paper_*/metrics.jsonl "$out/train_wide_paper_40steps.jsonl" ;;
  esac
  code=$?
  echo "$part: exit $code after $((SECONDS - start)) s" | tee -a "$out/device.txt"
  [ $code -eq 0 ] || status=$code
done
tail -n 15 "$out"/*.txt
exit $status
