#!/usr/bin/env bash
# benchmarks/gpu_check.py on the GPU machine, which lacks megatron-core: install the wheels
# carried in .whl/ (downloaded beforehand, see docs/gpu.md, "GPU check") into /tmp/site, then run the
# check with them and this checkout importable. Arguments go to gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
