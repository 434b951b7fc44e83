#!/usr/bin/env bash
# The DP pilot of comparison v3 (issue 30): seed 99, epsilon 8, each arm at its own clip bound (the
# rule in README.md) and a ladder of three learning rates around its no-DP pick (x1/3, x1, x3).
# Two runs at a time, one thread each:  bash docs/results/fedsvd-comparison-v3/pilot-dp/run.sh [ARM:LR ...]
# (with arguments, only those cells: the rule's extensions). A finished cell is not run again.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
here=docs/results/fedsvd-comparison-v3/pilot-dp
# arm, its clip bound (README.md: the median per-example gradient norm after its no-DP pilot run)
declare -A CLIP=([fedavg]=0.81 [fedavg+core]=0.008 [fedavg+paca]=0.072 [fedavg+svd]=0.0027 [fedex]=1.2
                 [fedsvd]=0.095 [ffa]=0.044 [flora]=0.04 [lora-fair]=1.4)
LADDER=(fedavg:0.01 fedavg:0.03 fedavg:0.1 fedavg+core:1 fedavg+core:3 fedavg+core:10
        fedavg+paca:0.1 fedavg+paca:0.3 fedavg+paca:1 fedavg+svd:3 fedavg+svd:10 fedavg+svd:30
        fedex:0.003 fedex:0.01 fedex:0.03 fedsvd:0.03 fedsvd:0.1 fedsvd:0.3
        ffa:0.1 ffa:0.3 ffa:1 flora:0.01 flora:0.03 flora:0.1 lora-fair:0.003 lora-fair:0.01 lora-fair:0.03)
cell() {  # ARM:LR -> one `fedpeft sweep` of that arm alone, in lr-LR/ARM/
  local arm=${1%%:*} lr=${1##*:} strategy family
  strategy=${arm%%+*}; family=lora; [[ $arm == *+* ]] && family=${arm#*+}
  [[ -f $here/lr-$lr/$arm/$arm/eps-8/seed-99/summary.json ]] && return 0
  OMP_NUM_THREADS=1 .venv/bin/fedpeft sweep simulations/fedsvd-comparison-v3-dp.toml --out "$here/lr-$lr/$arm" \
    --set "train.lr=$lr" "privacy.clip=${CLIP[$arm]}" 'sweep.seeds=[99]' 'sweep.epsilons=[8.0]' \
    "sweep.strategies=[\"$strategy\"]" "sweep.adapters=[\"$family\"]" 'sweep.lrs=[]' 'sweep.clips=[]' > "$here/lr-$lr/$arm.log" 2>&1 \
    || { echo "failed: $1 (see $here/lr-$lr/$arm.log)"; return 1; }
  echo "done: $1"
}
export -f cell; export here; export CLIP_TABLE="$(declare -p CLIP)"
cells=("$@"); [[ $# -eq 0 ]] && cells=("${LADDER[@]}")
for c in "${cells[@]}"; do mkdir -p "$here/lr-${c##*:}"; done
printf '%s\n' "${cells[@]}" | xargs -P 2 -I{} bash -c 'eval "$CLIP_TABLE"; cell {}'
