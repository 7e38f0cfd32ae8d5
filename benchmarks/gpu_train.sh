#!/usr/bin/env bash
# The poster's experiment at a larger size on a GPU: all 5,000 embedded MNIST digits (400 per class
# for training, the fixed 1,000-image test split held out), a deeper and wider bias-free ReLU MLP
# (4 x 512 against the CPU default 3 x 128), 2.7x the SGD steps, and the three weight decays (none, the
# default, twice it), same seed and schedule.
#
# Usage (repo root as cwd, torch with CUDA, no network needed):
#     OUT=/some/dir bash benchmarks/gpu_train.sh
# Writes, flat in $OUT (5 files): final.jsonl (one JSON object per weight decay: the last epoch's
# measures, theory predictions and SGD noise), history_wd<lambda>.csv (3 files, per-epoch history),
# table.txt (theory against measurement). Budget: about 4 minutes on one H200.
#
# UFM_GPU_TINY=1 runs a seconds-long CPU version of the same script (to check that it works).
set -euo pipefail
: "${OUT:?set OUT to a writable directory}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UFM_GPU_TINY="${UFM_GPU_TINY:-0}"

python - <<'PY'
import json, os, sys, tempfile, time
from pathlib import Path

import torch

from ufm.experiments.weight_decay import format_theory_table, weight_decay_experiment

out = Path(os.environ["OUT"])
if os.environ["UFM_GPU_TINY"] == "1":
    settings = dict(device="cpu", per_class=10, test_per_class=5, depth=3, width=16, epochs=3, batch_size=20)
else:
    if not torch.cuda.is_available():
        sys.exit("gpu_train.sh: torch sees no CUDA device (set UFM_GPU_TINY=1 for a CPU check)")
    # 80 steps per epoch x 200 epochs = 16,000 SGD steps per run (GPU steps cost ~1-2 ms, mostly
    # Python); lr 0.005 because a 4 x 512 net diverged at 0.01-0.02 in CPU trials (1024 wide: at 0.01).
    # Measured every 5 epochs: a measured epoch costs several training epochs.
    settings = dict(device="cuda", per_class=400, depth=4, width=512, epochs=200, batch_size=50,
                    lr=0.005, measure_every=5, checkpoint_every=100)
print("settings:", settings, "| torch", torch.__version__,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as runs:
    exp = weight_decay_experiment(out=runs, **settings)
    with open(out / "final.jsonl", "w") as f:
        for r in exp.results:
            row = r.final | {"wd": r.config.wd, "status": r.status, "message": r.message,
                             "nsteps": r.nsteps, "wall_s": round(r.wall_s, 1),
                             "singular_values_WL": r.singular_values[-1].tolist() if r.singular_values else None}
            f.write(json.dumps(row, allow_nan=False) + "\n")
            (out / f"history_wd{r.config.wd:g}.csv").write_bytes((r.out / "history.csv").read_bytes())
            print(f"wd={r.config.wd:g}: {r.message} in {r.wall_s:.1f} s", flush=True)
table = format_theory_table(exp.table)
(out / "table.txt").write_text(table + "\n")
print(table)
print(f"total {time.perf_counter() - t0:.1f} s")
PY
