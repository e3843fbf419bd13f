#!/usr/bin/env bash
# Debug aid: a ValueError thrown by a CPU kernel segfaulted on the GPU image (torch 2.11). Builds,
# then runs the failing call under cuda-gdb for a host backtrace.
set -u
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
gcc --version | head -1; python3 --version
python3 -m pip install --no-build-isolation -e . > /tmp/build.log 2>&1 || tail -30 /tmp/build.log
cat > /tmp/repro.py <<'PY'
import torch, moe_ext
for case in ["type", "value"]:
    try:
        if case == "type":
            moe_ext.topk_gating(torch.randn(4, 16).to(torch.int32), 2)
        else:
            moe_ext.topk_gating(torch.randn(16), 2)
    except Exception as e:
        print(case, "->", type(e).__name__, str(e).splitlines()[0])
PY
python3 /tmp/repro.py; echo "rc=$?"
cuda-gdb -batch -ex run -ex bt --args python3 /tmp/repro.py 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -40
