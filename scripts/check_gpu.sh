#!/usr/bin/env bash
# Device check for a CUDA GPU machine: the tests that skip without a GPU (pytest marker `gpu`), i.e.
# the cuDNN attention backend against the XLA reference (forward, gradients, the run-time fallback
# for segment ids cuDNN cannot express, and a bf16 model's logits). Exits non-zero when no GPU is
# visible to JAX, so a skipped run is never mistaken for a pass.
#
#   bash scripts/check_gpu.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys

import jax

backend = jax.default_backend()
print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
if backend not in ("gpu", "cuda"):
    sys.exit("check_gpu.sh: JAX sees no CUDA GPU (install jax[cuda12]); the gpu tests would only skip")
PY
python -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_attention.py "$@"
