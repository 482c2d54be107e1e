#!/usr/bin/env bash
# The demo: a 2-rank horovodrun PC-DARTS search on the embedded digits dataset (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
OUT=${DEMO_OUT:-runs/demo}
rm -rf "$OUT/search" "$OUT/train"
echo "== search: horovodrun -np 2 (Gloo) on digits, output $OUT/search"
horovodrun --gloo -np 2 -H localhost:2 python bin/train_search.py \
  --dataset digits --epochs 10 --arch-start-epoch 2 --arch-lr 0.1 --batch-size 64 --init-channels 8 --layers 5 \
  --workers 0 --output-dir "$OUT/search"
echo
echo "report:        $OUT/search/report.md  (how decided each edge is; pictures in $OUT/search/report/)"
echo "genotype:      $OUT/search/genotype.json"
echo "metrics:       $OUT/search/metrics.jsonl  (one JSON object per epoch)"
echo "checkpoint:    $OUT/search/checkpoint.pt  (resume with --resume auto)"
echo "log:           $OUT/search/log.txt, TensorBoard events in $OUT/search/tb"
if [ -d "$OUT/search/cells" ]; then echo "cell pictures: $OUT/search/cells/{normal,reduction}.{png,svg}"; fi
if python bin/plot_search.py "$OUT/search" >/dev/null 2>&1; then
  echo "arch weights:  $OUT/search/arch_weights.png"
fi

echo
echo "== retrain the found cell: horovodrun -np 2 bin/train.py (brief), output $OUT/train"
horovodrun --gloo -np 2 -H localhost:2 python bin/train.py --genotype "$OUT/search/genotype.json" \
  --dataset digits --epochs 4 --batch-size 64 --lr 0.1 --init-channels 8 --layers 5 --cutout-length 4 \
  --drop-path-prob 0.1 --workers 0 --output-dir "$OUT/train"
echo
echo "== evaluate $OUT/train/best.pt"
python bin/evaluate.py "$OUT/train/best.pt" --workers 0 > "$OUT/eval.txt"
head -n 1 "$OUT/eval.txt"
python - "$OUT/train/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"test accuracy of the retrained cell: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
      f"({r['params']} parameters, {r['macs']} MACs per image)")
PY
