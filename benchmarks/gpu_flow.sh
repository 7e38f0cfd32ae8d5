#!/usr/bin/env bash
# Gradient flow of the large UFM on a GPU with the torch integrator (float64, autograd gradient).
# Run from the repo root: OUT=/some/dir bash benchmarks/gpu_flow.sh [C N p] [device] [method]
# Default (C, N, p) = (100, 50, 256), lam_w = lam_h = 5e-4, device cuda, the library's default method
# (ufm.dynamics.DEFAULT_METHOD, which must run on the device: ETD2 does) at its default tolerances;
# stops at 1e-6 relative loss error or at the budget max_seconds = 100. Results are teed to
# $OUT/bench_flow_gpu.txt.
set -euo pipefail
C=${1:-100}; N=${2:-50}; P=${3:-256}; DEVICE=${4:-cuda}; METHOD=${5:-default}
OUT=${OUT:-.}
mkdir -p "$OUT"
timeout 115 python - "$C" "$N" "$P" "$DEVICE" "$METHOD" <<'PY' 2>&1 | tee "$OUT/bench_flow_gpu.txt"
import sys, time
import torch
from ufm.closed_form import ufm_optimum
from ufm.dynamics import DEFAULT_METHOD, METHODS, gradient_flow
from ufm.model import UFMParams, UFMProblem

C, N, p, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
method = DEFAULT_METHOD if sys.argv[5] == "default" else sys.argv[5]
# The tolerances of a default run (stationarity at 1e-8); this one stops at the target loss instead.
rtol, atol = METHODS[method].default_tolerances(1e-8)
lam = 5e-4
print(f"torch {torch.__version__}, device {device}, cuda available {torch.cuda.is_available()}")
if device.startswith("cuda"):
    print(torch.cuda.get_device_name(0))
problem = UFMProblem(C, N, lam, lam)
opt = ufm_optimum(C, N, lam, lam)
start = UFMParams.random(problem, p, rng=0)
print(f"(C, N, p) = ({C}, {N}, {p}): {start.ravel().size} parameters; closed-form loss {opt.loss:.10g}")
t0 = time.perf_counter()
r = gradient_flow(problem, start, method=method, device=device, target_loss=opt.loss * (1 + 1e-6), tol=0.0,
                  rtol=rtol, atol=atol, t_max=1e6, metrics=False, n_records=2, max_seconds=100)
wall = time.perf_counter() - t0
print(f"{r.method} (rtol {rtol:g}, atol {atol:g}) on {device}: {r.message}; {r.nfev} gradient evaluations; "
      f"wall {wall:.2f} s; rel loss error {r.loss[-1] / opt.loss - 1:.3e}; ||grad|| {r.grad_norm:.3e}")
PY
