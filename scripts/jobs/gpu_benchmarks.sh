#!/usr/bin/env bash
# One GPU call of the open benchmark rows, real size, random weights (nothing to download), in order of the
# issues that wait on them; each step has its own time limit, and a step that does not fit in what is left of
# SECONDS is skipped (named in the log) for the next call. Writes OUT_DIR/<step>.json + OUT_DIR/bench.log
# (at most 8 files: the device's return limit).
#   bash scripts/jobs/gpu_benchmarks.sh OUT_DIR SECONDS [STEP ...]
# Steps (default: all, in this order):
#   inference_eager     issue 13 / 17: scripts/benchmark_inference.py, eager (before: 5.19 s for 81 frames, H200)
#   inference_compiled  issue 13 / 17: the same with --compile (before: 4.09 s)
#   inference_cudnn     issue 17: eager with --cudnn-benchmark (the VAE decode's conv algorithms timed once)
#   train_dmd           issue 21: one-GPU real-size DMD iteration with the SP code in (N = 1 is the old path;
#                       before SP landed: docs/benchmarks/train.md)
#   sp_network          issue 21: the memory model's one-GPU check (1.3B student, 720p, forward + backward)
#   streaming           issue 18: peak CUDA memory and time per frame at 81 / 481 / 2001 frames, 480x832
set -u
out=$1; secs=$2; shift 2
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(inference_eager inference_compiled train_dmd sp_network streaming inference_cudnn)
start=$(date +%s)
mkdir -p "$out"
log=$out/bench.log
left() { echo $(( secs - ($(date +%s) - start) - 15 )); }

run() {  # run STEP NEEDED_SECONDS command...: skip when less than NEEDED_SECONDS are left
  local step=$1 need=$2; shift 2
  local budget; budget=$(left)
  if [ "$budget" -lt "$need" ]; then echo "$step: skipped ($budget s left, needs ~$need s)" | tee -a "$log"; return; fi
  echo "== $step (up to $budget s): $*" >>"$log"
  local t0; t0=$(date +%s)
  timeout "$budget" "$@" >>"$log" 2>&1
  echo "$step: rc $? after $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

W="roles.generator.weights=null roles.generator.pose_weights_path=null roles.critic.weights=null \
roles.critic.pose_weights_path=null roles.teacher.weights=null objective.gen_every=2"
for step in "${steps[@]}"; do
  case $step in
    inference_eager) run "$step" 120 python3 scripts/benchmark_inference.py --json "$out/$step.json" ;;
    inference_compiled) run "$step" 240 python3 scripts/benchmark_inference.py --compile --json "$out/$step.json" ;;
    inference_cudnn) run "$step" 150 python3 scripts/benchmark_inference.py --cudnn-benchmark --json "$out/$step.json" ;;
    # shellcheck disable=SC2086
    train_dmd) run "$step" 180 python3 scripts/benchmark_train.py --iterations 2 --json "$out/$step.json" $W ;;
    sp_network) run "$step" 90 python3 scripts/benchmark_sequence_parallel.py network --size 720p \
      --json "$out/$step.json" ;;
    streaming) run "$step" 300 python3 scripts/benchmark_streaming.py --frames 81 481 2001 --json "$out/$step.json" ;;
    *) echo "unknown step $step" | tee -a "$log"; exit 2 ;;
  esac
done
grep -v "Warning\|warn(" "$log" | tail -40
