#!/bin/bash
# The CADIT final protocol (README "CADIT"): source-only, DANN and CADIT on the three digits tasks
# (3 seeds on USPS<->MNIST, 1 on UCI->USPS), then the USPS->MNIST ablations, then the table.
# Resumable: rerun after a kill; finished runs (results.json present) are skipped, an interrupted
# one resumes from its last checkpoint. NICE=19 runs it at low priority beside other work.
#   bash train/cadit_table.sh            # ~3.5 h on 2 idle CPU cores (10 CADIT runs x ~19 min)
set -u
cd "$(dirname "$0")/.."
J=${JAXMM:-.venv/bin/jaxmm}
R=${RESULTS:-results/cadit}
mkdir -p "$R"
run() {  # task method seed out [--set KEY=VALUE ...]
  local task=$1 method=$2 seed=$3 out=$4; shift 4
  [ -f "$out/results.json" ] && return 0
  echo "$(date +%T) start $out"
  nice -n "${NICE:-0}" "$J" train cadit --task "$task" --method "$method" --seed "$seed" \
    --out "$out" "$@" > "$out.log" 2>&1 || { echo "FAILED $out (see $out.log)"; exit 1; }
  echo "$(date +%T) done $out"
}
for t in mnist-usps usps-mnist; do
  for s in 0 1 2; do
    for m in source-only dann cadit; do run $t $m $s "$R/$t-$m-s$s"; done
  done
done
for m in source-only dann cadit; do run uci-usps $m 0 "$R/uci-usps-$m-s0"; done
run usps-mnist cadit 0 "$R/abl-no-sp" --set use_sp=false
run usps-mnist cadit 0 "$R/abl-no-joint" --set joint_adv=false
run usps-mnist cadit 0 "$R/abl-no-cc" --set use_cc=false
"$J" eval digits-da "$R"/*-s[012] --out "$R/table.json" --markdown
"$J" eval digits-da "$R"/usps-mnist-cadit-s0 "$R"/abl-no-sp "$R"/abl-no-joint "$R"/abl-no-cc --out "$R/ablations.json" --markdown
