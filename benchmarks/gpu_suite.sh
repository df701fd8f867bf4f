#!/usr/bin/env bash
# One-shot GPU suite (benchmarks/gpu_suite.py) for a machine with one CUDA GPU and torch, transformers, peft and
# accelerate installed; nothing is downloaded and no real weights are loaded. Wheels placed in benchmarks/wheels/
# (see docs/benchmarks.md, "GPU suite") are installed first, without dependencies, into a private folder.
#
#   bash benchmarks/gpu_suite.sh                       # writes $OUT/gpu_suite.json (or benchmarks/results/)
#   bash benchmarks/gpu_suite.sh --dry-run             # tiny model on CPU: checks that everything runs
#
# The whole run is limited to GPU_SUITE_TIMEOUT seconds (default 480); the JSON is rewritten after every
# configuration, so a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUTPUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTPUT_DIR"
if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
    SITE="$(mktemp -d)"
    echo "installing $(ls benchmarks/wheels/*.whl | wc -l) wheel(s) from benchmarks/wheels into $SITE"
    "$PYTHON" -m pip install --quiet --no-deps --target "$SITE" benchmarks/wheels/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTPUT_DIR/gpu_card.txt"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_SUITE_TIMEOUT:-480}" "$PYTHON" benchmarks/gpu_suite.py --output "$OUTPUT_DIR/gpu_suite.json" "$@"
