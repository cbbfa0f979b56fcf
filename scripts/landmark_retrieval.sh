#!/usr/bin/env bash
# The landmark retrieval experiment of the README ("Copy heads"): pretraining on the shapes
# world plus landmark views with hybrid retrieval, with and without copy heads, each scored by
# eval/perplexity.py on held-out scenes and landmark views.
#
#   bash scripts/landmark_retrieval.sh OUTPUTS WORK [VIEWS]
#
# OUTPUTS: a finished main command's outputs/ (its text_tokenizer, image_tokenizer, retriever
# and tokens/shapes-heldout are reused, read-only). WORK: a new folder; its outputs/ gets the
# training tokens with VIEWS landmark views (default 12000), 500 held-out views, a memory bank
# with TF-IDF rows, the two checkpoints (pretrain_ctrl, pretrain_copy) and their metrics
# (ppl_ctrl.json, ppl_copy.json). About 25 minutes on 2 idle cores. Reruns skip finished steps.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "${1:?usage: landmark_retrieval.sh OUTPUTS WORK [VIEWS]}" && pwd)
WORK=${2:?usage: landmark_retrieval.sh OUTPUTS WORK [VIEWS]}
VIEWS=${3:-12000}
for d in text_tokenizer image_tokenizer retriever tokens/shapes-heldout; do
  [ -f "$SRC/$d/manifest.json" ] || { echo "missing $SRC/$d/manifest.json: run the main command first" >&2; exit 1; }
done
mkdir -p "$WORK/outputs/tokens"
WORK=$(cd "$WORK" && pwd)
O=$WORK/outputs
for d in text_tokenizer image_tokenizer retriever tokens/shapes-heldout; do ln -sfn "$SRC/$d" "$O/$d"; done
PY=${PYTHON:-$ROOT/.venv/bin/python}
export LIT_CM3LEON_ROOT=$WORK HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$WORK"
tok() { $PY -m lit_cm3leon.prepare tokenize --source shapes --caption long --tokenizer "$O/image_tokenizer" "$@"; }
tok --split train --n 20000 --landmark-views "$VIEWS" --out "$O/tokens/shapes-train"
tok --split heldout --n 0 --landmark-views 500 --out "$O/tokens/landmarks-heldout"
[ -f "$O/index/manifest.json" ] || $PY -m lit_cm3leon.prepare index --encoder "$O/retriever" \
  --tokens "$O/tokens/shapes-train" --out "$O/index"
run() {  # name, overrides...
  local name=$1; shift
  [ -f "$O/$name/manifest.json" ] || $PY -m lit_cm3leon.fit experiment=pretrain \
    retrieval.lexical_weight=1.0 task="$name" stage="$name" "~callbacks.sample_grid" "$@"
  local out=$WORK/ppl_${name#pretrain_}.json
  [ -f "$out" ] || $PY "$ROOT/eval/perplexity.py" --outputs "$O" --ckpt "$O/$name" --n 500 --out "$out"
}
run pretrain_ctrl
run pretrain_copy model.copy_heads=2 model.copy_bias=8
