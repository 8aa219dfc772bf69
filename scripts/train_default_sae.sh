#!/usr/bin/env bash
# Reproduces the default SAE (sae/pretrained/smollm2-135m-res10-k32) from the corpus in ../shared/corpus.
# On 2 CPU cores: ~30 min to collect activations, ~20 min to train, ~3 min to evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
HOOK=blocks.10.hook_resid_post
mkdir -p .cache
[ -f .cache/acts_l10_train.safetensors ] || saesteer collect --hook-point $HOOK --data ../shared/corpus --split train --n-tokens 2000000 --out .cache/acts_l10_train.safetensors
[ -f .cache/acts_l10_val.safetensors ] || saesteer collect --hook-point $HOOK --data ../shared/corpus --split validation --n-tokens 120000 --out .cache/acts_l10_val.safetensors
saesteer train --hook-point $HOOK --data ../shared/corpus --acts .cache/acts_l10_train.safetensors --val-acts .cache/acts_l10_val.safetensors \
  --architecture batchtopk --d-sae 4608 --k 32 --n-tokens 3000000 --lr 7e-4 --seed 0 --dtype float16 \
  --out sae/pretrained/smollm2-135m-res10-k32
