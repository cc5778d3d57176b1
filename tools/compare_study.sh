#!/usr/bin/env bash
# The shipped comparison study (docs/results/compare-study): the paper's methods on the
# demo's real model (DINOv2-S + SmolLM2-135M) with 3 seeds, swept learning rates, both
# ablations and both analyses, on a 1000-image test set.
#
# Resumable in chunks: run it again after an interruption (or on another machine after
# copying the study folder) and finished arms are skipped. The study folder keeps what
# the report needs (summaries, loss logs, predictions, scores, similarity); adapters,
# checkpoints and the feature store stay out of git (see its .gitignore), so on a fresh
# machine an arm cut before its evaluation and analysis were written trains again.
#
# Usage: bash tools/compare_study.sh [LNTUNE] (default target/release/lntune)
set -euo pipefail
lntune=${1:-target/release/lntune}
work=${STUDY_WORK:-/tmp/lntune-study}       # demo model and generated data (regenerated)
out=${STUDY_OUT:-docs/results/compare-study} # the shipped study folder
threads=${STUDY_THREADS:-2}

# the stage-1 projector every arm starts from is shipped with the study, so that every
# chunk of the study starts its arms from the same weights on any machine
stage1="$out/inputs/stage1"

if [ ! -f "$work/dm/model/compose.json" ]; then
  "$lntune" --threads "$threads" fetch demo
  "$lntune" --threads "$threads" demo --level full --out "$work/dm"
fi
if [ ! -f "$stage1/adapter.safetensors" ]; then
  mkdir -p "$stage1"
  cp "$work/dm/stage1/adapter/"* "$stage1/"
fi
if [ ! -f "$work/test1000/vqa_test_questions.json" ]; then
  "$lntune" --threads "$threads" data shapes --level full --train 0 --test 1000 --size 126 \
    --seed 1 --out "$work/test1000"
fi
# the generated inputs must be the ones the shipped arms were trained and scored on:
# a digest of every data file and of each image folder, checked before resuming
manifest() {
  (cd "$work" && sha256sum dm/stage2_rounds.json dm/data/*_train.json dm/model/*.json \
    test1000/*.json test1000/*.jsonl
   for d in dm/data/images test1000/images; do
     echo "$(cd "$d" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-64)  $d/"
   done)
}
mkdir -p "$out/inputs"
if [ -f "$out/inputs/data.sha256" ]; then
  if ! diff <(manifest) "$out/inputs/data.sha256" >&2; then
    echo "the regenerated data differ from $out/inputs/data.sha256 (above); not resuming" >&2
    exit 1
  fi
else
  manifest > "$out/inputs/data.sha256"
fi

dm="$work/dm"
exec "$lntune" --threads "$threads" compare --model "$dm/model" --init-adapter "$stage1" \
  --data "$dm/stage2_rounds.json,$dm/data/reasoning_train.json:100,$dm/data/captions_train.json:200" \
  --images "$dm/data/images" --template chatml --max-length 256 \
  --methods full,lora,attn-qv,mlp,ln,ln-simple --steps 120 --batch 4 --grad-accum 2 \
  --lr-sweep --seeds 0,1,2 \
  --bench shapes --eval-data "$work/test1000" --eval-limit 1000 \
  --eval-limit-of pope=200 --eval-limit-of mme=400 --eval-limit-of captions=200 \
  --eval-batch 48 \
  --ablation connector --ablation data-type --data-type-tokens 3600 --data-type-epochs 3 \
  --data-types "conversation=$dm/data/conversation_train.json,detail=$dm/data/detail_train.json,reasoning=$dm/data/reasoning_train.json" \
  --similarity-samples 64 --quiet --out "$out"
