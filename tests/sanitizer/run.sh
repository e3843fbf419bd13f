#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the routing kernels (fused decode kernel included),
# the grouped GEMMs, every config of both tables (grouped_gemm_cases.py) and the decode expert GEMVs
# (expert_gemv_cases.py).
# PyTorch's caching allocator is turned off so an out-of-bounds access lands outside any allocation.
# Usage (on a GPU machine, after the build): [SAN_CASES="routing_cases ..."] bash tests/sanitizer/run.sh [log-dir]
set -uo pipefail
LOG=${1:-/tmp/moe_ext_sanitizer}
mkdir -p "$LOG"
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
status=0
for cases in ${SAN_CASES:-routing_cases grouped_gemm_cases expert_gemv_cases}; do
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 3 \
      python3 "$(dirname "$0")/$cases.py" > "$LOG/$cases-$tool.log" 2>&1
    rc=$?
    echo "$cases $tool: rc=$rc $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|ok$" "$LOG/$cases-$tool.log" | tr '\n' ' ')"
    [ $rc -eq 0 ] || status=1
  done
done
exit $status
