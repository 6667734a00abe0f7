#!/usr/bin/env bash
# One-shot accelerator check (run on a lent GPU machine, never in CI):
#   parity of the JAX path on the GPU (fused attention) against the official model on the CPU,
#   then speed of both on the GPU. Needs the pure-Python wheels the GPU image lacks in .whl/
#   (ml_collections, hydra-core, omegaconf, antlr4-python3-runtime, iopath, nibabel, sam2).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
{ nvidia-smi -L; python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"; } 2>&1 | tee "$OUT/env.log"
export PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -q -p no:cacheprovider -x tests/test_attention.py tests/test_memory_modules.py \
  tests/test_image_predictor.py tests/test_tracker_parity.py 2>&1 | tee "$OUT/pytest.log" | tail -5
timeout 120 python3 benchmarks/bench_model.py --config sam2.1_tiny --device cuda --repeats 10 2>&1 | grep -v Warn | tee "$OUT/bench_model.log"
timeout 150 python3 benchmarks/bench_tracker.py --config sam2.1_tiny --device cuda --frames 16 --repeats 3 2>&1 | grep -v Warn | tee "$OUT/bench_tracker.log"
