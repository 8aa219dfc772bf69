#!/usr/bin/env bash
# Which hook point should the default SAE sit at? Trains one BatchTopK SAE per block (6, 8, 10) with
# the same recipe and budget (1 M collected tokens, 1.5 M training tokens, d_sae 4608, k 32), then
# measures each one's reconstruction (saesteer eval, run by train) and steerability (saesteer
# eval-steering on benchmarks/concepts.json). Results: docs/hook_point_study.md, from
# `python scripts/summarize_hook_study.py`.
# On 2 CPU cores: ~15 min to collect, ~8 min to train each, ~8 min to evaluate steering each.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.cache/hook_study}
BLOCKS=${BLOCKS:-"6 8 10"}
mkdir -p "$OUT/train" "$OUT/val"
HOOKS=(); for L in $BLOCKS; do HOOKS+=(--hook-point "blocks.$L.hook_resid_post"); done
[ -f "$OUT/train/.done" ] || { saesteer collect "${HOOKS[@]}" --data ../shared/corpus --split train --n-tokens 1000000 --out "$OUT/train" && touch "$OUT/train/.done"; }
[ -f "$OUT/val/.done" ] || { saesteer collect "${HOOKS[@]}" --data ../shared/corpus --split validation --n-tokens 60000 --out "$OUT/val" && touch "$OUT/val/.done"; }
for L in $BLOCKS; do
  H=blocks.$L.hook_resid_post
  SAE=$OUT/sae_l$L
  [ -f "$SAE/cfg.json" ] || saesteer train --hook-point $H --data ../shared/corpus --acts "$OUT/train/$H.safetensors" --val-acts "$OUT/val/$H.safetensors" \
      --architecture batchtopk --d-sae 4608 --k 32 --n-tokens 1500000 --lr 7e-4 --seed 0 --out "$SAE"
  [ -f "$SAE/latent_stats.safetensors" ] || saesteer stats "$SAE" --data ../shared/corpus --n-tokens 50000
  # the five concepts whose latent is found by contrast (the sixth names a latent of the default SAE)
  [ -f "$OUT/steer_l$L/report.json" ] || saesteer eval-steering "$SAE" --concepts benchmarks/concepts.json \
      --only cats ocean "python code" space music --out "$OUT/steer_l$L"
done
