#!/usr/bin/env bash
# A from-scratch drafter run for the default model sized for ~90 minutes on two cores (README "Training a
# drafter"): continuations + vocabulary + teacher forcing, then code openers, then training with the step count
# that fills the rest of the 90 minutes at SECONDS_PER_STEP (default 0.6; ~0.45 on a Zen 4 with native bfloat16,
# ~0.95 on an AVX2-only one). As run on 2026-12-02 on an AVX2-only VM it took 102 min (the steps were slower than
# 0.6 s) and gave a weaker drafter than the shipped one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/drafter-90min}
START=$(date +%s)
COMMON="--out $OUT --threads 2 --sequences 150 --self-generated 240 --batch-positions 128 --lr 2e-3"
.venv/bin/gemmaspec train-drafter $COMMON --openers 720 --steps 0
.venv/bin/gemmaspec train-drafter $COMMON --resume --openers 160 --opener-genres code --steps 0
LEFT=$(( START + 90 * 60 - $(date +%s) ))
STEPS=$(python3 -c "print(int(($LEFT - 150) / ${SECONDS_PER_STEP:-0.6}))")
echo "training: $LEFT s left, --steps $STEPS"
.venv/bin/gemmaspec train-drafter $COMMON --resume --openers 160 --opener-genres code --steps $STEPS
echo "total $(( $(date +%s) - START )) s"
