#!/usr/bin/env bash
# One GPU call of the world teacher: write the training set if it is missing (make_toy_dataset.py --encode; the
# same seeds always give the same set), then train or resume (--resume auto) until SECONDS from the call's start
# are spent (train.max_minutes), and copy what comes back to OUT_DIR: the log, metrics.jsonl, the resolved config
# and the exports (the EMA weights in fp16, as shipped; the raw weights in fp32 as two shards + index in
# OUT_DIR/teacher_fp32/, which a later session's run loads as roles.teacher.weights=<that folder>).
#   bash scripts/jobs/world_teacher.sh OUT_DIR SECONDS [key=val ...]
#   WORLD_CLIPS=4000 WORLD_REF_CHOICES=3 BENCH_DMD=1 (also runs the real-size DMD benchmark beside the data step)
set -u
out=$1; secs=$2; shift 2
start=$(date +%s)
mkdir -p "$out"
clips=${WORLD_CLIPS:-4000}
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
if [ "${BENCH_DMD:-0}" = 1 ]; then
  W="roles.generator.weights=null roles.generator.pose_weights_path=null roles.critic.weights=null \
     roles.critic.pose_weights_path=null roles.teacher.weights=null objective.gen_every=2"
  python3 scripts/benchmark_train.py --iterations 2 --json "$out/train_dmd_1gpu.json" $W >"$out/bench_dmd.log" 2>&1 &
  bench=$!
fi
python3 scripts/make_toy_dataset.py --encode --out data/world/train --num-samples "$clips" --seed 1000000 \
  --workers "$workers" --ref-choices "${WORLD_REF_CHOICES:-3}" >"$out/data.log" 2>&1 || { tail -20 "$out/data.log"; exit 1; }
[ "${BENCH_DMD:-0}" = 1 ] && { wait $bench; tail -8 "$out/bench_dmd.log"; }
left=$(( secs - ($(date +%s) - start) - 45 ))
echo "data ready after $(( $(date +%s) - start )) s; training for $left s"
python3 train.py --config configs/world/teacher.yaml --resume auto train.max_minutes="$(python3 -c "print($left / 60)")" \
  "$@" >"$out/train.log" 2>&1
rc=$?
grep -v "UserWarning\|return func" "$out/train.log" | tail -4
run=runs/world_teacher
cp "$run/metrics.jsonl" "$run/config.yaml" "$out/" 2>/dev/null
python3 - "$run/export" "$out" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if (src / "teacher_ema.safetensors").exists():
    from safetensors import safe_open
    meta = safe_open(str(src / "teacher_ema.safetensors"), "pt").metadata()
    ema = load_file(src / "teacher_ema.safetensors")
    save_file({k: v.half() for k, v in ema.items()}, dst / "teacher_ema_fp16.safetensors", meta)
    raw = load_file(src / "teacher.safetensors")
    keys = sorted(raw)
    folder = dst / "teacher_fp32"  # two shards + index (each under the 16 MiB return limit): a warm start loads
    folder.mkdir(exist_ok=True)   # it as roles.teacher.weights=<folder>
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"teacher-{i + 1:05d}-of-00002.safetensors"
        save_file({k: raw[k] for k in part}, folder / name, meta)
        weight_map.update({k: name for k in part})
    import json
    (folder / "teacher.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    print("exports copied")
PY
exit $rc
