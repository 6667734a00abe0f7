#!/usr/bin/env bash
# One-shot accelerator check (run on a lent GPU machine, never in CI; about 8 minutes in all):
#   speed of the tracker on the GPU against the official predictor, then parity of the JAX path on
#   the GPU (fused attention) against the official model on the CPU, then the modules' speed.
#   Needs the pure-Python wheels the GPU image lacks in .whl/
#   (ml_collections, hydra-core, omegaconf, antlr4-python3-runtime, iopath, nibabel, sam2).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
{ nvidia-smi -L; python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/env.log"
export PYTHONUNBUFFERED=1
# A persistent compilation cache: a rerun on the same machine skips XLA compilation.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax_medsam2}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
# The tracker at 1024 px on 64 frames and 512 px on 24, TF32 off on both sides (full float32).
timeout 240 python3 benchmarks/bench_tracker.py --cases 512:24,1024:64 --device cuda --repeats 3 --no-tf32 2>&1 \
  | grep -v Warn | tee "$OUT/bench_tracker.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_attention.py tests/test_memory_modules.py \
  tests/test_image_predictor.py tests/test_tracker_parity.py 2>&1 | tee "$OUT/pytest.log" | tail -5
timeout 60 python3 benchmarks/bench_model.py --config sam2.1_tiny --device cuda --repeats 10 2>&1 | grep -v Warn | tee "$OUT/bench_model.log"
