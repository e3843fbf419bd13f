#!/usr/bin/env bash
# One device session: build for sm_90a, run the GPU tests, the demo, (SANITIZE=1) compute-sanitizer
# and the benchmarks; logs and result files go to $OUT (the device tool brings them back).
# Usage: [TESTS='tests/test_x.py ...'] [SANITIZE=1] bash bench/gpu_run.sh [bench...]
set -uo pipefail
OUT=${OUT:-/tmp/moe_ext_out}
RES=$OUT
OUT=/tmp/moe_ext_logs  # logs gathered here, packed into $RES/logs.tgz at the end
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"
start=$SECONDS
python3 -m pip install --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
python3 -c "import moe_ext; print('import ok:', moe_ext.LIBRARY_PATH); print({op: moe_ext.has_kernel(op, 'cuda') for op in ['topk_gating','moe_align_block_size','fused_topk_align','silu_and_mul','moe_grouped_gemm','moe_grouped_gemm_silu','moe_combine','moe_gemv_silu','moe_gemv_combine']})" 2>&1 | tee "$OUT/import.txt"
# Every test (CPU and CUDA cases); -rs lists why cases skipped; the full log comes back in $OUT.
# One pytest per file, so a crash in one cannot hide the others' results.
for f in ${TESTS:-tests/test_*.py}; do
  python3 -m pytest -q -rs "$f" -p no:cacheprovider > "$OUT/$(basename "$f" .py).log" 2>&1
  echo "$f: rc=$? $(grep -E "passed|failed|error|Fatal" "$OUT/$(basename "$f" .py).log" | tail -1)"
done
grep -h -E "^(FAILED|ERROR)" "$OUT"/test_*.log | head -20
python3 -m moe_ext 2>&1 | tee "$OUT/demo.log" | tail -8
if [ "${SANITIZE:-0}" = 1 ]; then bash tests/sanitizer/run.sh "$OUT/sanitizer"; fi
for b in "$@"; do
  (cd bench && python3 "$b" 2>&1 | tee "$OUT/$(basename "$b" .py).log")
done
find bench/results -type f -newer "$OUT/gpu.txt" -exec cp {} "$RES"/ \;  # only what this run wrote
tar -czf "$RES/logs.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
