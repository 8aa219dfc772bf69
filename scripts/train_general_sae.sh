#!/usr/bin/env bash
# A general-English SAE at block 10 (issue 15 part 2) on the corpus of `saesteer corpus build`:
# the default SAE's recipe (BatchTopK, k 32, sinks and chat-template specials kept out), more latents.
# Figures on the corpus's validation split (figures.json) and on shared/corpus (figures_shared.json).
# Run with `nice -n 10` on a shared machine. OUT defaults to runs/sae-general-res10-6144.
set -euo pipefail
cd "$(dirname "$0")/.."
HOOK=blocks.10.hook_resid_post
D_SAE=${D_SAE:-6144}
N_COLLECT=${N_COLLECT:-2000000}
N_TRAIN=${N_TRAIN:-3000000}
OUT=${OUT:-runs/sae-general-res10-$D_SAE}
CORPUS=${CORPUS:-runs/corpus}
mkdir -p .cache
[ -f "$CORPUS/manifest.json" ] || saesteer corpus build --out "$CORPUS"
[ -f .cache/acts_general_l10_train.safetensors ] || saesteer collect --hook $HOOK --data "$CORPUS" --split train \
  --n-tokens "$N_COLLECT" --out .cache/acts_general_l10_train.safetensors
[ -f .cache/acts_general_l10_val.safetensors ] || saesteer collect --hook $HOOK --data "$CORPUS" --split validation \
  --n-tokens 120000 --out .cache/acts_general_l10_val.safetensors
saesteer train --hook $HOOK --data "$CORPUS" --acts .cache/acts_general_l10_train.safetensors \
  --val-acts .cache/acts_general_l10_val.safetensors --architecture batchtopk --d-sae "$D_SAE" --k 32 \
  --n-tokens "$N_TRAIN" --lr 7e-4 --seed 0 --dtype float16 --out "$OUT"
saesteer eval "$OUT" --data ../shared/corpus --split validation --n-tokens 120000 --json "$OUT/figures_shared.json"
