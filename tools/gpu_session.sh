#!/usr/bin/env bash
# One short GPU session: the whole-step and LoRA GEMM benchmarks first, then the test suite on CUDA, the planner against real steps under emulated
# 8/12/16/24 GB cards, and the benchmark matrix (subset), every part under its own time limit so
# that one slow part cannot hide the others' results. Everything lands in $OUT/gpu.tar.gz.
#   OUT=/tmp/gpu-out bash tools/gpu_session.sh
# PARTS picks parts (default: "tests vram demo bench speed"; speed refits the planner's speed model); BENCHES picks benchmark files; LORA_K
# narrows the LoRA matrix (a pytest -k expression). Wheels the machine lacks (bitsandbytes,
# liger-kernel, jsonschema) may sit in .whl/.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PARTS=${PARTS:-tests vram demo bench speed}
BENCHES=${BENCHES:-step lora losses rope silu train}
R=/tmp/gpu-results
mkdir -p "$R" "${OUT:?set OUT}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$R/pip.log" 2>&1 || echo "wheel install failed" | tee -a "$R/pip.log"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
finish() { tar -czf "$OUT/gpu.tar.gz" -C "$R" . ; ls -la "$R"; }
trap finish EXIT
has() { [[ " $1 " == *" $2 "* ]]; }

nvidia-smi > "$R/nvidia-smi.txt" 2>&1
timeout 30 python3 -c "from swengine.cli import main; main()" doctor --json > "$R/doctor.json" 2> "$R/doctor.err"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)
import bitsandbytes; print('bnb', bitsandbytes.__version__)" 2>&1 | tee "$R/versions.txt"

# benchmarks run alone, one file (or half) per pytest run: a timeout loses only that part
bench() {  # name seconds pytest-args...
  local name=$1 secs=$2; shift 2
  timeout -k 5 "$secs" python3 -m pytest -q -p no:cacheprovider --benchmark-disable-gc \
    --benchmark-json="$R/bench_$name.json" "$@" > "$R/bench_$name.log" 2>&1
  echo "bench $name exit $?" | tee -a "$R/bench_$name.log"
}
# 0. the measurements nobody has yet, first and alone: the whole training step (ours vs
# transformers+PEFT(+Liger), bf16 and NF4) and the fused LoRA / NF4-LoRA GEMMs vs PEFT and cuBLAS
if has "$PARTS" bench; then
  has "$BENCHES" step && bench step "${STEP_SECONDS:-150}" bench/test_train_step.py
  has "$BENCHES" lora && bench lora "${LORA_SECONDS:-90}" bench/test_lora.py -k "${LORA_K:-T8192}"
fi

# 0b. the planner's speed model for this GPU architecture: real training steps of preset models,
# fitted and written into swengine/planner/speed.json (copied out: commit it with the results)
if has "$PARTS" speed; then
  timeout -k 5 "${SPEED_SECONDS:-150}" python3 tools/calibrate_speed.py --device cuda --samples "${SPEED_SAMPLES:-24}" \
    --seconds "$(( ${SPEED_SECONDS:-150} - 30 ))" > "$R/speed.log" 2>&1
  echo "speed exit $?" | tee -a "$R/speed.log"
  cp swengine/planner/speed.json "$R/speed.json" 2>/dev/null
  tail -n 3 "$R/speed.log"
fi

# 1. tests, the planner check and the demo side by side (correctness; timings come later, alone)
pids=()
if has "$PARTS" tests; then
  SWENGINE_TEST_LOG="$R/tests_outcomes.txt" timeout -k 5 "${TEST_SECONDS:-180}" python3 -m pytest tests -q \
    -p no:cacheprovider -n "${WORKERS:-12}" --timeout 150 -rfE --junitxml="$R/tests.xml" > "$R/tests.log" 2>&1 &
  pids+=($!)
fi
if has "$PARTS" vram; then
  timeout -k 5 "${VRAM_SECONDS:-150}" python3 tools/vram_check.py --out "$R/vram_check.jsonl" \
    --cards "${VRAM_CARDS:-rtx-4060,rtx-3060,rtx-4060-ti-16g,rtx-4090}" \
    --models "${VRAM_MODELS:-qwen2.5-0.5b,llama-3.2-1b,llama-3.2-3b,llama-3.1-8b}" > "$R/vram_check.log" 2>&1 &
  pids+=($!)
fi
if has "$PARTS" demo; then
  timeout -k 5 "${DEMO_SECONDS:-60}" python3 -c "from swengine.cli import main; main()" train \
    output_dir=/tmp/demo-gpu > "$R/demo_train.log" 2>&1
  echo "demo train exit $?" >> "$R/demo_train.log"
fi
for p in "${pids[@]}"; do wait "$p"; echo "part $p exit $?"; done
grep -c ^PASSED "$R/tests_outcomes.txt" 2>/dev/null; grep "^FAILED\|^ERROR" "$R/tests_outcomes.txt" 2>/dev/null | head -50
tail -n 5 "$R/tests.log" 2>/dev/null; cat "$R/vram_check.log" 2>/dev/null; tail -n 5 "$R/demo_train.log" 2>/dev/null

if has "$PARTS" bench; then
  has "$BENCHES" losses && bench losses 40 bench/test_losses.py
  has "$BENCHES" rope && bench rope 30 bench/test_rope.py
  has "$BENCHES" silu && bench silu 20 bench/test_silu_mul.py
  has "$BENCHES" train && bench train 40 bench/test_train.py
  for f in "$R"/bench_*.json; do [ -s "$f" ] && python3 tools/bench_report.py "$f" >> "$R/report.md" 2>&1; done
  cat "$R/report.md" 2>/dev/null
fi
