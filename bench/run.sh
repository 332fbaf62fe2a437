#!/usr/bin/env bash
# Run the whole benchmark matrix on this machine (all GPU shapes on CUDA, CPU shapes and smoke
# runs otherwise) and write bench/results/<gpu-or-host>/<date>.json plus a markdown table beside it.
#   bash bench/run.sh [extra pytest args, e.g. -k lora]
set -euo pipefail
cd "$(dirname "$0")/.."
name=$(python -c "import platform, re, torch
n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu-' + platform.node()
print(re.sub(r'[^A-Za-z0-9._-]+', '-', n).strip('-'))")
out="bench/results/$name/$(date -u +%Y-%m-%d).json"
mkdir -p "$(dirname "$out")"
SWBENCH_FULL=1 python -m pytest bench/ -q -p no:cacheprovider --benchmark-disable-gc --benchmark-json="$out" "$@"
python tools/bench_report.py "$out" | tee "${out%.json}.md"
echo "results: $out"
