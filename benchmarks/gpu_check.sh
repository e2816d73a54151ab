#!/usr/bin/env bash
# The GPU check of issue 12: on a fresh GPU machine, in under 8 minutes, create an environment,
# run the CUDA-marked tests, then the rerank / encode / fusion benchmarks on the GPU, writing
# everything under $OUT. On a machine without CUDA the CUDA parts are skipped and it exits 0.
#
#   bash benchmarks/gpu_check.sh                              # venv + pip install from the index
#   WHEELHOUSE=/path/to/wheels bash benchmarks/gpu_check.sh   # offline: wheels only, no index
#   VENV=.venv bash benchmarks/gpu_check.sh                   # reuse an environment (dry run)
#
# Variables (all optional):
#   OUT         results folder (default ./gpu_check_out): summary.json, env.json, cuda_tests.xml,
#               cuda_tests.log, <benchmark>.json, one .log per step
#   VENV        an existing virtual environment to use instead of creating one
#   ENV_DIR     where to create the environment (default ./.gpu_check_venv)
#   PYTHON      interpreter for the new environment (default python3.12, else python3)
#   WHEELHOUSE  folder of wheels (``pip wheel -w DIR . pytest pytest-timeout hypothesis
#               setuptools wheel`` on a machine with the same Python and platform): installs
#               with --no-index from it
#   SYSTEM_SITE 1 (default): the new venv sees the system site-packages, so a torch already
#               installed on the machine (with its CUDA libraries) is reused, not downloaded
#   BUDGET_S    total time budget in seconds (default 470); steps that would start too late
#               are skipped and reported as such
#   DEVICE      torch device for the benchmarks (default cuda)
#   BENCH_WITHOUT_CUDA  1: run the benchmark steps even without CUDA (with DEVICE=cpu: checks
#               the benchmark commands in a dry run; slow on a small CPU)
# Exit status: 0 when every step that ran passed (skips included), else 1.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET_S="${BUDGET_S:-470}"
DEVICE="${DEVICE:-cuda}"
SYSTEM_SITE="${SYSTEM_SITE:-1}"
START=$SECONDS
STEPS_FILE="$OUT/steps.tsv"
: >"$STEPS_FILE"
rm -f "$OUT/env.json" "$OUT/summary.json"
FAILED=0

log() { printf '[gpu_check %4ss] %s\n' "$((SECONDS - START))" "$*" >&2; }

left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME MIN_SECONDS MAX_SECONDS COMMAND...: run with a timeout, output in $OUT/NAME.log;
# skipped when fewer than MIN_SECONDS of the budget are left. Records name, status, seconds.
step() {
  local name="$1" min_s="$2" max_s="$3"
  shift 3
  local remaining
  remaining="$(left)"
  if ((remaining < min_s)); then
    log "$name: skipped (only ${remaining}s of the budget left)"
    printf '%s\tskipped_budget\t0\n' "$name" >>"$STEPS_FILE"
    return 0
  fi
  ((max_s > remaining)) && max_s=$remaining
  log "$name: running (limit ${max_s}s)"
  local began=$SECONDS rc
  timeout --kill-after=10 "$max_s" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - began))
  if ((rc == 0)); then
    printf '%s\tok\t%s\n' "$name" "$took" >>"$STEPS_FILE"
    log "$name: ok (${took}s)"
  else
    FAILED=1
    local status="failed_rc_$rc"
    ((rc == 124 || rc == 137)) && status="timed_out"
    printf '%s\t%s\t%s\n' "$name" "$status" "$took" >>"$STEPS_FILE"
    log "$name: $status (${took}s), last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" >&2
  fi
  return "$rc"
}

CUDA=0
# summary.json from the steps table (plain bash: works even when no Python environment exists)
finish() {
  local ok=true entries="" name status seconds
  ((FAILED)) && ok=false
  while IFS=$'\t' read -r name status seconds; do
    entries+="${entries:+,}
    {\"step\": \"$name\", \"status\": \"$status\", \"seconds\": $seconds}"
  done <"$STEPS_FILE"
  printf '{\n  "cuda": %s,\n  "elapsed_s": %s,\n  "ok": %s,\n  "steps": [%s\n  ]\n}\n' \
    "$([[ "$CUDA" == "1" ]] && echo true || echo false)" "$((SECONDS - START))" "$ok" \
    "$entries" | tee "$OUT/summary.json"
  log "done in $((SECONDS - START))s: $OUT/summary.json"
  exit "$FAILED"
}

skip() { # skip NAME REASON
  printf '%s\t%s\t0\n' "$1" "$2" >>"$STEPS_FILE"
  log "$1: $2"
}

# ---- 1. the environment ------------------------------------------------------------------------
if [[ -n "${VENV:-}" ]]; then
  PY="$VENV/bin/python"
  if [[ ! -x "$PY" ]]; then
    log "VENV=$VENV has no bin/python"
    FAILED=1
    skip create_env "no_python_in_VENV"
    finish
  fi
  skip create_env "reused_$VENV"
else
  ENV_DIR="${ENV_DIR:-$ROOT/.gpu_check_venv}"
  BASE_PY="${PYTHON:-}"
  if [[ -z "$BASE_PY" ]]; then
    BASE_PY="$(command -v python3.12 || command -v python3)"
  fi
  venv_flags=()
  [[ "$SYSTEM_SITE" == "1" ]] && venv_flags+=(--system-site-packages)
  step create_env 10 120 "$BASE_PY" -m venv "${venv_flags[@]}" "$ENV_DIR" || finish
  PY="$ENV_DIR/bin/python"
  pip_flags=(--disable-pip-version-check --progress-bar off)
  if [[ -n "${WHEELHOUSE:-}" ]]; then
    pip_flags+=(--no-index --find-links "$WHEELHOUSE")
  fi
  step pip_install 30 330 "$PY" -m pip install "${pip_flags[@]}" \
    "$ROOT" pytest pytest-timeout hypothesis || finish
fi
# the checkout's code, not an installed copy, is what is tested and measured
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

step environment 5 60 "$PY" - "$OUT/env.json" <<'PYEOF' 
import json, platform, subprocess, sys

import torch

import tb_reranker

info = {
    "python": platform.python_version(),
    "platform": platform.platform(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "tb_reranker": tb_reranker.__file__,
}
if torch.cuda.is_available():
    info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    info["tf32_matmul_allowed"] = torch.backends.cuda.matmul.allow_tf32
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
with open(sys.argv[1], "w") as handle:
    json.dump(info, handle, indent=2)
print(json.dumps(info, indent=2))
PYEOF
[[ -s "$OUT/env.json" ]] || finish
CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
log "cuda available: $CUDA"

# ---- 2. the CUDA-marked tests (they skip themselves without CUDA) -------------------------------
step cuda_tests 30 240 "$PY" -m pytest -q -m cuda tests/unit -p no:cacheprovider \
  -o addopts="" -rs --timeout 200 --junitxml "$OUT/cuda_tests.xml"

# ---- 3. the benchmarks on the GPU --------------------------------------------------------------
if [[ "$CUDA" == "1" || "${BENCH_WITHOUT_CUDA:-0}" == "1" ]]; then
  step bench_text_encode 40 120 "$PY" -m benchmarks.text_encode --device "$DEVICE" \
    --rounds 6 --max-seconds 15 --out "$OUT"
  step bench_text_encode_fp32 40 100 "$PY" -m benchmarks.text_encode --device "$DEVICE" \
    --precision float32 --rounds 4 --max-seconds 10 --out "$OUT/float32"
  step bench_rerank_cost 60 200 "$PY" -m benchmarks.rerank_cost --device "$DEVICE" \
    --repeats 30 --target-repeats 200 --max-seconds 0.5 --no-plot --out "$OUT"
  step bench_fusion 20 90 bash -c \
    "'$PY' benchmarks/fusion_cpu.py --device '$DEVICE' --repeats 30 >'$OUT/fusion_gpu.json' && \
     '$PY' benchmarks/fusion_cpu.py --device '$DEVICE' --bf16 --repeats 30 >'$OUT/fusion_gpu_bf16.json'"
else
  for name in bench_text_encode bench_text_encode_fp32 bench_rerank_cost bench_fusion; do
    skip "$name" skipped_no_cuda
  done
fi

# ---- 4. the summary ----------------------------------------------------------------------------
finish
