#!/usr/bin/env bash
# The general-English SAEs (issue 15 part 2) on the corpus of `saesteer corpus build`: the default
# SAE's recipe (BatchTopK, sinks and chat-template specials kept out) with more latents, at block 10
# and at block 18 (after SmolLM2's attention sink has formed, where output features live).
# Two stages per SAE: N_TRAIN tokens from scratch at k K, then (N_CONTINUE > 0) N_CONTINUE more
# tokens at k K2 from the first stage's weights (`saesteer train --init`): the SAE was still
# improving at the end of stage one, and a larger k cut the loss most (docs/general_sae.md).
# One collection pass serves both hook points. Per SAE: figures on the corpus's validation split
# (figures.json), on shared/corpus (figures_shared.json) and on text outside the corpus's domains
# (figures_emails.json, figures_python_source.json; scripts/build_ood_text.py), then latent
# statistics and output scores (what concept search and eval-steering read).
# Run with `nice -n 10` on a shared machine. BLOCKS defaults to "10 18"; OUT_ROOT to runs.
# The shipped sae/pretrained/smollm2-135m-general-res10-k96 is block 10 of this script's defaults
# (docs/general_sae.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCKS=${BLOCKS:-10 18}
D_SAE=${D_SAE:-6144}
K=${K:-64}
K2=${K2:-96}
N_CONTINUE=${N_CONTINUE:-3000000}
N_COLLECT=${N_COLLECT:-2000000}
N_TRAIN=${N_TRAIN:-2500000}
OUT_ROOT=${OUT_ROOT:-runs}
CORPUS=${CORPUS:-runs/corpus}
OOD=${OOD:-runs/ood}
mkdir -p .cache
[ -f "$CORPUS/manifest.json" ] || saesteer corpus build --out "$CORPUS" --shared ../shared/corpus
[ -f "$OOD/emails.jsonl.gz" ] || python scripts/build_ood_text.py --out "$OOD"
HOOKS=()
for b in $BLOCKS; do HOOKS+=(--hook "blocks.$b.hook_resid_post"); done
# one pass of the model per split collects every hook point (--out is then a folder; with one hook
# point collect writes a file, so it is named inside the folder)
collect_once() {  # SPLIT N_TOKENS DIR
  [ -d "$3" ] && return
  if [ ${#HOOKS[@]} -eq 2 ]; then
    mkdir -p "$3" && saesteer collect "${HOOKS[@]}" --data "$CORPUS" --split "$1" --n-tokens "$2" --out "$3/${HOOKS[1]}.safetensors"
  else
    saesteer collect "${HOOKS[@]}" --data "$CORPUS" --split "$1" --n-tokens "$2" --out "$3"
  fi
}
collect_once validation 120000 .cache/acts_general_val
collect_once train "$N_COLLECT" .cache/acts_general_train
for b in $BLOCKS; do
  HOOK=blocks.$b.hook_resid_post
  ACTS=(--acts ".cache/acts_general_train/$HOOK.safetensors" --val-acts ".cache/acts_general_val/$HOOK.safetensors")
  OUT=$OUT_ROOT/smollm2-135m-general-res$b-k$K
  [ -f "$OUT/cfg.json" ] || saesteer train --hook $HOOK --data "$CORPUS" "${ACTS[@]}" --architecture batchtopk \
    --d-sae "$D_SAE" --k "$K" --n-tokens "$N_TRAIN" --lr 7e-4 --seed 0 --dtype float16 --out "$OUT"
  if [ "$N_CONTINUE" -gt 0 ]; then
    FIRST=$OUT
    OUT=$OUT_ROOT/smollm2-135m-general-res$b-k$K2
    [ -f "$OUT/cfg.json" ] || saesteer train --hook $HOOK --data "$CORPUS" "${ACTS[@]}" --architecture batchtopk \
      --d-sae "$D_SAE" --k "$K2" --n-tokens "$N_CONTINUE" --lr 5e-4 --seed 1 --dtype float16 --init "$FIRST" --out "$OUT"
  fi
  saesteer eval "$OUT" --data ../shared/corpus --split validation --n-tokens 60000 --json "$OUT/figures_shared.json"
  for ood in emails python_source; do
    saesteer eval "$OUT" --data "$OOD/$ood.jsonl.gz" --n-tokens 60000 --json "$OUT/figures_$ood.json"
  done
  saesteer stats "$OUT" --data "$CORPUS" --split validation
  saesteer stats "$OUT" --output-scores
done
