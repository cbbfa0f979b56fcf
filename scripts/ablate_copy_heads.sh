#!/usr/bin/env bash
# The copy-head ablation of the README ("Retrieval and copy heads"): the main command's
# pretraining again without copy heads (model.copy_heads=0), scored like the main command's
# decoder by eval/perplexity.py on held-out scenes and landmark views.
#
#   bash scripts/ablate_copy_heads.sh OUTPUTS [N]
#
# OUTPUTS: a finished main command's outputs/ (its tokenizers, shards, memory bank and
# eval/perplexity are reused). Writes OUTPUTS/pretrain_nocopy (the decoder) and
# OUTPUTS/eval/perplexity_nocopy/metrics.json (N held-out pairs and views, default 500), beside
# the main command's OUTPUTS/eval/perplexity/metrics.json. About 7 minutes on 2 idle cores.
# Reruns skip finished steps.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
O=$(cd "${1:?usage: ablate_copy_heads.sh OUTPUTS [N]}" && pwd)
N=${2:-500}
[ "$(basename "$O")" = outputs ] || { echo "$O: expected the main command's outputs/ folder" >&2; exit 1; }
for d in text_tokenizer image_tokenizer index tokens/shapes-train tokens/landmarks-heldout; do
  [ -f "$O/$d/manifest.json" ] || { echo "missing $O/$d/manifest.json: run the main command first" >&2; exit 1; }
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
export LIT_CM3LEON_ROOT=$(dirname "$O") HF_HUB_OFFLINE=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$LIT_CM3LEON_ROOT"
[ -f "$O/pretrain_nocopy/manifest.json" ] || $PY -m lit_cm3leon.fit experiment=pretrain \
  model.copy_heads=0 task=pretrain_nocopy stage=pretrain_nocopy "~callbacks.sample_grid"
M=$O/eval/perplexity_nocopy/metrics.json
[ -f "$M" ] || $PY "$ROOT/eval/perplexity.py" --outputs "$O" --ckpt "$O/pretrain_nocopy" --n "$N" --out "$M"
