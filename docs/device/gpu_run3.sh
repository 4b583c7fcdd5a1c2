#!/usr/bin/env bash
set -u
export PYTHONPATH=$PWD/.carry/site:$PWD PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "=== $1 at +$(( $(date +%s) - T0 )) s"; }
stamp pytest
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_split_cuda.py 2>&1 | tee $OUT/pytest.log | tail -15
stamp idle
timeout 90 python3 .carry/gpu_idle.py cuda 2>&1 | tee $OUT/idle.log | tail -20
stamp done
