#!/usr/bin/env bash
# Train (or resume) the toy VAE on all GPUs of one host inside a fixed time, with the cosine schedule sized to it.
#   bash scripts/jobs/toy_vae_timed.sh OUT_DIR SECONDS [key=val ...]
# A throwaway run (75 s with start-up, never saved) measures steps/s with the same settings; the real run then gets
# steps = (resumed step) + 0.92 * steps/s * SECONDS (a multiple of save_every=250), max_minutes = SECONDS / 60 and
# export_on_stop=true, so it anneals and exports inside the window. OUT_DIR/train_state.pt, if present, resumes.
set -u
out=$1; secs=$2; shift 2
ngpu=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
run() { torchrun --standalone --nproc_per_node "$ngpu" scripts/train_toy_vae.py "$@"; }
timeout 75 bash -c "$(declare -f run); ngpu=$ngpu; run --out /tmp/toy_vae_bench $* steps=1000000 log_every=50 eval_every=0 save_every=1000000" \
  >"$out.bench.log" 2>&1
sps=$(grep -o '[0-9.]* steps/s' "$out.bench.log" | tail -n 1 | cut -d' ' -f1)
first=$(python -c "import torch,sys; p=sys.argv[1]; import os; print(torch.load(p, map_location='cpu', weights_only=True)['step'] if os.path.exists(p) else 0)" "$out/train_state.pt")
steps=$(python -c "print(($first + int(0.92 * float('${sps:-2}') * $secs)) // 250 * 250)")
echo "bench ${sps:-?} steps/s; resuming at $first; steps=$steps"
run --out "$out" "$@" steps="$steps" max_minutes="$(python -c "print($secs / 60)")" export_on_stop=true
