#!/usr/bin/env bash
# The GPU measurements of issue 8 in one prepared run, for a session that is lent a GPU machine
# (PyTorch, Lightning and torchvision preinstalled there; nothing is installed).
#
#   run: bash benchmarks/gpu_checks.sh        (at most 9 minutes on one H200; timeout_s 600)
#
# Each benchmark updates benchmarks/RESULTS.md (batch 128, bf16 autocast on the GPU); the log of
# every step and the updated RESULTS.md are copied to $OUT, to be committed from the CPU side.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - > "$OUT/imports.txt" 2>&1 <<'PY'
import importlib
for name in ("torch", "lightning", "torchvision", "torchmetrics", "jsonargparse", "tensorboard"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # report, do not stop: later steps say what they need
        print(name, "MISSING", err)
PY
step() {  # step NAME SECONDS COMMAND...: a time-boxed benchmark with its own log
    local name=$1 seconds=$2
    shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?" >> "$OUT/summary.txt"
    grep -E '^\|' "$OUT/$name.txt" >> "$OUT/summary.txt"
}
step overhead 90 python benchmarks/overhead.py
step pipeline 120 python benchmarks/pipeline.py
# Last: inductor compiles about ten models (minutes); what finishes in time is kept.
step overhead-compiled 330 python benchmarks/overhead.py --compile
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
