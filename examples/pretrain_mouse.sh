#!/usr/bin/env bash
# End to end on a CPU in minutes: gene medians of two 100-cell mouse files -> tokens -> pretrain a small
# mouse-Geneformer-shaped model (examples/pretrain_mouse_tiny.json) -> cell embeddings from its checkpoint.
# Usage: examples/pretrain_mouse.sh [WORK_DIR]   (MOUSE_DATA=dir of the .h5ad files, STEPS=number of steps)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
M=${MOUSE_DATA:-/work/shared/data/mouse}
W=${1:-pretrain_mouse_out}
STEPS=${STEPS:-300}
FILES=("$M/scvelo_pancreas_100obs.h5ad" "$M/scvelo_dentategyrus_100obs.h5ad")
mkdir -p "$W"
export SCFM_FAST_TRITON=${SCFM_FAST_TRITON:-0}  # a CPU runs the encoder's PyTorch ops, not Triton's interpreter

scfm medians "${FILES[@]}" --out "$W/dict"
scfm tokenize "${FILES[@]}" --out "$W/tokens" --token-dictionary "$W/dict/token_dictionary.pkl" \
    --gene-median "$W/dict/gene_median_dictionary.pkl" --gene-name-map none --max-len 256
scfm pretrain "$W/tokens" --out "$W/run" --config "$HERE/pretrain_mouse_tiny.json" \
    --token-dictionary "$W/dict/token_dictionary.pkl" --max-steps "$STEPS" --batch-tokens 1024 --lr 3e-3 \
    --warmup 0.1 --schedule cosine --eval-fraction 0.05 --eval-every 50 --save-every 100 --dtype float32 \
    --log-every 10
scfm embed "$W/tokens" --model "$W/run/checkpoint-$STEPS" --out "$W/emb" --device cpu

# first and last logged training loss, every eval loss
python - "$W/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
print(f"train loss: step {train[0]['step']} {train[0]['loss']:.3f} -> step {train[-1]['step']} {train[-1]['loss']:.3f}")
print("eval loss:", ", ".join(f"step {r['step']} {r['eval_loss']:.3f}" for r in rows if "eval_loss" in r))
PY
echo "loss plot: $W/run/loss.png; embeddings: $W/emb"
