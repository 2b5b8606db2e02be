#!/usr/bin/env bash
# `make demo`: train the shipped Swin UNETR bundle on the phantom, segment two held-out phantom cases
# (another random stream: new patients), score them, and say where the pictures and the table are.
set -euo pipefail
BIN=${BIN:-.venv/bin}
DEMO=${DEMO:-runs/demo-$(date +%Y%m%d-%H%M%S)}
"$BIN/medseg" train bundles/swin_unetr.json --run-dir "$DEMO"
"$BIN/medseg" synth "$DEMO/heldout" --cases 2 --seed 1 > /dev/null
"$BIN/medseg" infer "$DEMO/heldout/imagesTr" --run "$DEMO" -o "$DEMO/heldout/pred" --preview
"$BIN/medseg" evaluate "$DEMO/heldout/pred" "$DEMO/heldout" -o "$DEMO/heldout/scores"
echo
echo "run:         $DEMO  (weights, bundle with its plan, metrics.csv; mlflow ui --backend-store-uri sqlite:///mlflow.db)"
echo "pictures:    $DEMO/heldout/pred/*_seg.png"
echo "scores:      $DEMO/heldout/scores.csv  (held-out cases, classes matched by name)"
