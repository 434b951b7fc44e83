#!/usr/bin/env bash
# The DP grid of comparison v3 (issue 30) and its ceiling: one process per budget, one thread each,
# so the two cores run both budgets at once (~80 min here). Each budget is its own sweep directory
# (eps-8/, eps-3/: a sweep directory holds one spec); a finished cell is not run again, so the
# script resumes where it stopped.
#   bash docs/results/fedsvd-comparison-v3/grid-dp/run.sh
# The ceiling: centralised DP-SGD, one client holding the union of the three clients' data, batch
# 1,536 (the federation's examples per round: same sampling rate, so the same sigma), 24 steps,
# fedavg's lr and clip bound from the pilot (not tuned for the ceiling), per budget and seed.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
here=docs/results/fedsvd-comparison-v3/grid-dp
ceiling=docs/results/fedsvd-comparison-v3/ceiling-dp  # beside the grid, so that its runs are not read as grid cells
spec=simulations/fedsvd-comparison-v3-dp.toml
budget() {
  local eps=$1
  OMP_NUM_THREADS=1 .venv/bin/fedpeft sweep $spec --out "$here/eps-$eps" --set "sweep.epsilons=[$eps.0]" \
    > "$here/eps-$eps.log" 2>&1 || { echo "grid failed at epsilon $eps (see $here/eps-$eps.log)"; return 1; }
  echo "grid done: epsilon $eps"
  mkdir -p "$ceiling"
  OMP_NUM_THREADS=1 .venv/bin/fedpeft sweep $spec --out "$ceiling/eps-$eps" --set "sweep.epsilons=[$eps.0]" \
    federation.clients=1 federation.clients_per_round=1 train.batch_size=1536 train.lr=0.1 privacy.clip=0.81 \
    'sweep.strategies=["fedavg"]' 'sweep.adapters=["lora"]' 'sweep.lrs=[]' 'sweep.clips=[]' \
    > "$ceiling/eps-$eps.log" 2>&1 || { echo "ceiling failed at epsilon $eps (see $ceiling/eps-$eps.log)"; return 1; }
  echo "ceiling done: epsilon $eps"
}
budget 8 & a=$!
budget 3 & b=$!
wait $a; wait $b
