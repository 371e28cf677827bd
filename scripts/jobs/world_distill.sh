#!/usr/bin/env bash
# GPU calls of the world distillation (issue 15), from the world teacher: run the named steps in order, each
# resumable (a step that the time budget stops continues at the next call, on a warm machine whose data/ and
# runs/ are kept), and copy what comes back to OUT_DIR within the device's return limits (8 files of <= 16 MiB):
# OUT_DIR/logs.tgz (logs, metrics.jsonl, resolved configs, finished markers, the evaluation tables) and, for
# every step that ran, its exports in fp16: <run>_fp16.safetensors (EMA) and <run>_raw_fp16.safetensors (raw).
# A later step starts from the one of the two that the last validation evaluation (eval.ema) scored higher.
#   bash scripts/jobs/world_distill.sh OUT_DIR SECONDS STEP [STEP ...]
# Steps (in this order; a finished step is skipped):
#   data        the training clips (make_toy_dataset.py --encode; the same seeds as the teacher's)
#   pairs       ODE pairs of the world teacher (50 UniPC steps, CFG 1.5) for the first $PAIRS clips
#   ode_init    causal ODE init of the world student
#   dmd_a sid_a Path A: ODE init -> DMD / SiD          sf sf_gan   Self-Forcing (+GAN) from the ODE init
#   finetune_b  Path B: ODE init -> pose finetune      dmd_b sid_b Path B: pose finetune -> DMD / SiD
#   eval        scripts/evaluate_world.py on $EVAL_CLIPS test clips: teacher rows and every finished student
# Env: TEACHER (default assets/world_teacher/teacher.safetensors), WORLD_CLIPS (3000), PAIRS (2000),
#      EVAL_CLIPS (32), EVAL_ROWS (the teacher's rows, default ceiling,cfg50,steps4; empty: students only),
#      REFERENCE_FRAMES (an earlier evaluate_world --save-frames folder of the teacher's cfg50 frames: the
#      agreement reference, so cfg50 need not run again), ABLATE (a student row to also score without pose, e.g.
#      dmd_a), WORLD_OVERRIDES (world
#      config overrides for data and eval, e.g. "num_frames=5 height=32 width=32" for a CPU smoke run),
#      WARM (a previous session's OUT_DIR with logs.tgz extracted in place: finished steps are skipped, later
#      ones start from its <run>_fp16.safetensors;
#      a warm-started ode_init trains its configured iterations again: shorten with train.iterations=N).
#      Extra key=val go to every train.py call.
set -u
out=$1; secs=$2; shift 2
steps=(); while [ $# -gt 0 ] && [[ "$1" != *=* ]]; do steps+=("$1"); shift; done
start=$(date +%s)
mkdir -p "$out/logs"
logs=$out/logs
pack() {  # one archive of the small files, so the exports fit the 8 files that come back
  tar czf "$out/logs.tgz" -C "$logs" . && rm -rf "$logs"
}
trap pack EXIT
teacher=${TEACHER:-assets/world_teacher/teacher.safetensors}
left() { echo $(( secs - ($(date +%s) - start) - 40 )); }
done_marker() { echo "runs/$1/.finished"; }

pick() {  # METRICS_JSONL -> "ema" or "raw": the weights the last validation eval (eval.ema) scored higher on PCK
  python3 - "$1" <<'PY'
import json, sys
best = "ema"
try:
    for line in open(sys.argv[1]):
        d = json.loads(line)
        if "eval/pck@0.05" in d and "eval_ema/pck@0.05" in d:
            best = "ema" if d["eval_ema/pck@0.05"] >= d["eval/pck@0.05"] else "raw"
except OSError:
    pass
print(best)
PY
}

export_of() {  # the generator export a later step starts from (EMA or raw, by `pick`): the run's own or WARM's
  local run=$1 which
  if [ -f "runs/$run/export/generator_ema.safetensors" ]; then
    which=$(pick "runs/$run/metrics.jsonl")
    [ "$which" = ema ] && echo "runs/$run/export/generator_ema.safetensors" || echo "runs/$run/export/generator.safetensors"
  elif [ -n "${WARM:-}" ] && [ -f "$WARM/${run}_fp16.safetensors" ]; then
    which=$(pick "$WARM/$run.metrics.jsonl")
    [ "$which" = ema ] && echo "$WARM/${run}_fp16.safetensors" || echo "$WARM/${run}_raw_fp16.safetensors"
  else echo ""; fi
}

train() {  # train RUN CONFIG key=val...: resume, stop at the budget, mark finished, copy back
  local run=$1 config=$2; shift 2
  if [ -f "$(done_marker "$run")" ] || { [ -n "${WARM:-}" ] && [ -f "$WARM/$run.finished" ]; }; then
    echo "$run: finished earlier"; return 0
  fi
  local budget; budget=$(left)
  [ "$budget" -lt 60 ] && { echo "$run: no time left"; return 1; }
  echo "$run: training for up to $budget s"
  python3 train.py --config "$config" --resume auto run.name="$run" \
    train.max_minutes="$(python3 -c "print($budget / 60)")" "$@" "${EXTRA[@]}" >"$logs/$run.log" 2>&1
  local rc=$?
  grep -v "UserWarning\|return func" "$logs/$run.log" | tail -3
  cp "runs/$run/metrics.jsonl" "$logs/$run.metrics.jsonl" 2>/dev/null
  cp "runs/$run/config.yaml" "$logs/$run.config.yaml" 2>/dev/null
  if [ -f "runs/$run/export/generator_ema.safetensors" ]; then
    python3 - "runs/$run/export" "$out" "$run" <<'PY'
import sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
src, dst, run = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for name, suffix in (("generator_ema", "_fp16"), ("generator", "_raw_fp16")):
    meta = safe_open(str(src / f"{name}.safetensors"), "pt").metadata()
    save_file({k: v.half() for k, v in load_file(src / f"{name}.safetensors").items()},
              dst / f"{run}{suffix}.safetensors", meta)
PY
  fi
  [ $rc -ne 0 ] && return $rc
  grep -q "train.max_minutes=.* reached" "$logs/$run.log" && return 1
  touch "$(done_marker "$run")" "$logs/$run.finished"
}

from_init() {  # key=vals that start generator and critic (and discriminator) of a step from a run's export
  local init; init=$(export_of "$1")
  [ -z "$init" ] && { echo "no export of $1 (run it first, or set WARM)" >&2; return 1; }
  echo "roles.teacher.weights=$teacher roles.generator.weights=$init roles.critic.weights=$init" \
    "roles.discriminator.weights=$init"
}

EXTRA=("$@")
for step in "${steps[@]}"; do
  case $step in
    data)
      workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
      python3 scripts/make_toy_dataset.py --encode --out data/world/train --num-samples "${WORLD_CLIPS:-3000}" \
        --seed 1000000 --workers "$workers" --ref-choices "${WORLD_REF_CHOICES:-3}" ${WORLD_OVERRIDES:-} \
        >"$logs/data.log" 2>&1 \
        || { tail -20 "$logs/data.log"; exit 1; }
      echo "data ready after $(( $(date +%s) - start )) s" ;;
    pairs)
      [ -f "$teacher" ] || { echo "no world teacher at $teacher (TEACHER=...)"; exit 1; }
      timeout "$(left)" python3 scripts/generate_ode_pairs.py --preset world_teacher --weights "$teacher" \
        --source data/world/train --out data/world/ode_pairs --limit "${PAIRS:-2000}" --dtype fp32 \
        --batch-size 32 >"$logs/pairs.log" 2>&1
      rc=$?; tail -2 "$logs/pairs.log"
      echo "pairs: $(ls data/world/ode_pairs | grep -c safetensors) after $(( $(date +%s) - start )) s"
      [ $rc -ne 0 ] && exit 1 ;;
    ode_init)
      warm=()  # a new machine: continue from the last session's export (AdamW moments restart)
      if [ ! -d runs/world_ode_init ] && [ -n "$(export_of world_ode_init)" ]; then
        warm=("roles.generator.weights=$(export_of world_ode_init)"); echo "ode_init: warm start from ${warm[0]}"
      fi
      train world_ode_init configs/world/ode_init.yaml "${warm[@]}" || exit 1 ;;
    dmd_a) train world_dmd_a configs/world/dmd.yaml $(from_init world_ode_init) || exit 1 ;;
    sid_a) train world_sid_a configs/world/sid.yaml $(from_init world_ode_init) || exit 1 ;;
    sf) train world_sf configs/world/self_forcing.yaml $(from_init world_ode_init) || exit 1 ;;
    sf_gan) train world_sf_gan configs/world/self_forcing_gan.yaml $(from_init world_ode_init) || exit 1 ;;
    finetune_b)
      train world_finetune_b configs/world/pose_finetune.yaml "roles.generator.weights=$(export_of world_ode_init)" \
        || exit 1 ;;
    dmd_b) train world_dmd_b configs/world/dmd.yaml $(from_init world_finetune_b) || exit 1 ;;
    sid_b) train world_sid_b configs/world/sid.yaml $(from_init world_finetune_b) || exit 1 ;;
    eval)
      args=()
      for run in world_ode_init world_dmd_a world_sid_a world_finetune_b world_dmd_b world_sid_b world_sf world_sf_gan; do
        w=$(export_of $run); [ -n "$w" ] && args+=(--student "${run#world_}=$w")
      done
      timeout "$(left)" python3 scripts/evaluate_world.py --weights "$teacher" --clips "${EVAL_CLIPS:-32}" \
        --rows "${EVAL_ROWS-ceiling,cfg50,steps4}" "${args[@]}" ${ABLATE:+--ablate "$ABLATE"} \
        ${REFERENCE_FRAMES:+--reference-frames "$REFERENCE_FRAMES"} --out "$logs/eval" ${WORLD_OVERRIDES:-} \
        >"$logs/eval.log" 2>&1
      rc=$?; tail -16 "$logs/eval.log"; [ $rc -ne 0 ] && exit 1 ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit 0
