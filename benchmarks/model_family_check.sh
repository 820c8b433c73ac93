#!/usr/bin/env bash
# Every s/m/l/x config of the small-object family (-spdconv, -spdlite, -p2, -p2-spdconv) through the whole
# tool chain: train 1 epoch from scratch on coco8 at 64 px, val.py, detect.py on ../shared/images, export.py to
# ONNX (which checks the export against PyTorch), and count Slice/SpaceToDepth nodes in the ONNX graph (0 for
# every SPD variant: SPDConv folds into one stride-2 conv in the export form). The n configs are covered by
# tests/test_model_family.py. Writes benchmarks/model_family_check.txt; about 20 minutes on 2 CPU cores.
#   bash benchmarks/model_family_check.sh [work dir, default a new temp dir]
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d)}
OUT=benchmarks/model_family_check.txt
mkdir -p "$WORK"
cp -r ../shared/data/coco8 "$WORK/coco8"  # never write label caches into ../shared
sed "s#^path: .*#path: $WORK/coco8#" ../shared/data/coco8/coco8.yaml > "$WORK/coco8.yaml"
{
  echo "# bash benchmarks/model_family_check.sh; $(date -u +%Y-%m-%dT%H:%MZ); $(python -c 'import torch, platform; print(f"torch {torch.__version__}, {platform.platform()}")'); $(nproc) CPUs"
  echo "# exit codes of train.py / val.py / detect.py / export.py, then Slice and SpaceToDepth nodes in the ONNX file"
} > "$OUT"
for size in s m l x; do for fam in spdconv spdlite p2 p2-spdconv; do
  cfg=yolov5${size}-${fam}; W=$WORK/runs/$cfg/weights/best.pt; t0=$(date +%s)
  python train.py --data "$WORK/coco8.yaml" --cfg $cfg.yaml --weights '' --img 64 --batch 4 --epochs 1 --workers 0 \
    --device cpu --project "$WORK/runs" --name $cfg --exist-ok > "$WORK/$cfg.train.log" 2>&1; a=$?
  python val.py --weights "$W" --data "$WORK/coco8.yaml" --img 64 --workers 0 --project "$WORK/val" --name $cfg \
    --exist-ok > "$WORK/$cfg.val.log" 2>&1; b=$?
  python detect.py --weights "$W" --source ../shared/images --img 64 --project "$WORK/det" --name $cfg --exist-ok \
    > "$WORK/$cfg.det.log" 2>&1; c=$?
  python export.py --weights "$W" --include onnx --img 64 > "$WORK/$cfg.export.log" 2>&1; e=$?
  nodes=$(python -c "import onnx; g = onnx.load('${W%.pt}.onnx').graph; print(sum(n.op_type == 'Slice' for n in g.node), sum(n.op_type == 'SpaceToDepth' for n in g.node))" 2>/dev/null || echo "- -")
  echo "$cfg train=$a val=$b detect=$c export=$e slice,spacetodepth=${nodes// /,} seconds=$(( $(date +%s) - t0 ))" | tee -a "$OUT"
done; done
