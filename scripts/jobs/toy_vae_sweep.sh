#!/usr/bin/env bash
# Train several toy-VAE variants side by side, each a plain scripts/train_toy_vae.py run, spread round-robin
# over the visible GPUs (more variants than GPUs share them: the tiny VAE leaves most of a GPU idle).
#   bash scripts/jobs/toy_vae_sweep.sh OUT_DIR "name1 key=val ..." "name2 key=val ..." ...
# Each variant writes OUT_DIR/<name>/ (train_state.pt, vae/, metrics.json) and OUT_DIR/<name>.log; a rerun with
# the same OUT_DIR resumes every variant. Extra keys for all variants go in SWEEP_ARGS (e.g. max_minutes=7.5).
# With PACK=DIR, the exports, metrics and logs of all variants are packed to DIR/<basename OUT_DIR>.tar.?? in
# 15 MB parts (a device call brings back few, small files); unpack with: cat DIR/NAME.tar.* | tar xf -
set -u
out=$1; shift
mkdir -p "$out"
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
[ "$ngpu" -ge 1 ] || ngpu=1
i=0
pids=()
for spec in "$@"; do
  read -r name overrides <<<"$spec"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$((i % ngpu)) python scripts/train_toy_vae.py --out "$out/$name" $overrides ${SWEEP_ARGS:-} \
    >"$out/$name.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for spec in "$@"; do
  read -r name _ <<<"$spec"
  echo "== $name"; tail -n 4 "$out/$name.log"
done
if [ -n "${PACK:-}" ]; then
  mkdir -p "$PACK"
  (cd "$out" && tar cf - ./*.log ./*/metrics.json ./*/vae 2>/dev/null) | split -b 15M - "$PACK/$(basename "$out").tar."
  ls -l "$PACK"
fi
exit $rc
