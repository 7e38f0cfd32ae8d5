#!/usr/bin/env bash
# ufm.nc_metrics on a CUDA GPU: the benchmark table of benchmarks/bench_metrics.py (library vs the peer
# library's accumulate-then-pseudo-invert NC1 vs one pass over the features, and the streaming peak memory), then the CUDA test.
# Run from the repository root with torch+CUDA installed; OUT must be a writable directory.
# Takes well under 2 minutes on an H100/H200.
set -euo pipefail
: "${OUT:?set OUT to a writable output directory}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/bench_metrics_gpu.txt"
for dtype in float64 float32; do
  timeout 50 python benchmarks/bench_metrics.py --device cuda --dtype "$dtype" --rounds 1 --memory 2>&1 | tee -a "$OUT/bench_metrics_gpu.txt"
done
timeout 60 python -m pytest -q -p no:cacheprovider tests/test_collect.py -k cuda 2>&1 | tail -3 | tee -a "$OUT/bench_metrics_gpu.txt"
