#!/usr/bin/env bash
# The checks that need a GPU, as one script (no CPU machine of this project has one): run it from
# the repository root on a host with PyTorch, torchaudio and transformers. Ray, MLflow and Optuna
# are not needed; soundfile is (the synthetic corpus of bench train's part (c)): if the host lacks
# it, carry its wheel in .whl/ (pip download soundfile==0.14.0 --only-binary=:all: -d .whl).
#
#   bash infra/gpu-check.sh                      # writes $OUT (or /tmp/gpu-check)/*.txt
#   DEVICE=cpu SIZES=tiny bash infra/gpu-check.sh   # the same script where there is no GPU
#
# What it prints, each part also into a file under $OUT:
#   gpu.txt           the device (nvidia-smi)
#   bench_train.txt   sertune bench train: pipeline vs model-step ceiling (target >= 0.85), and
#                     (c) a small trial's epoch beside its end-of-trial evaluation (target <= 2)
#   bench_encoder.txt sertune bench encoder: WavLM Base- and Large-sized encoders (random weights),
#                     frozen and top-2 fine-tuned, bf16: samples/s of the train step on 3 s clips,
#                     peak memory per slot and slots per GPU, fixed cost per trial warm vs from disk
#   tests_cuda.txt    the tests that skip without CUDA (model, augmentation, SSL on the device)
set -u
py=${PYTHON:-python3}  # the interpreter that holds PyTorch
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
device=${DEVICE:-cuda}
sizes=${SIZES:-base,large}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .whl/*.whl
    export PYTHONPATH=/tmp/gpu-check-site
fi
export PYTHONPATH="$PWD/platform:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
 "$py" -c "import torch, torchaudio, transformers; print('torch', torch.__version__, 'torchaudio', torchaudio.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())") \
    | tee "$out/gpu.txt"

echo "== bench train (device $device)"
"$py" - "$device" <<'EOF' 2>&1 | tee "$out/bench_train.txt"
import sys
from trainables.mtl_aug.bench import run_bench
r = run_bench(device=sys.argv[1])
print(f"(a) ceiling  (train step on features on the device): {r.ceiling:,.0f} samples/s")
print(f"(b) pipeline (waveform -> augment -> log-mel -> step): {r.pipeline:,.0f} samples/s")
print(f"pipeline/ceiling: {r.ratio:.2f}")
EOF

echo "== bench encoder (device $device, sizes $sizes)"
"$py" - "$device" "$sizes" <<'EOF' 2>&1 | tee "$out/bench_encoder.txt"
import sys
from trainables.mtl_aug.bench_ssl import run
run(sizes=sys.argv[2].split(","), device=sys.argv[1])
EOF

echo "== the tests that need CUDA"
"$py" -m pytest -q -p no:cacheprovider tests/trainables/test_model.py tests/trainables/test_augment.py \
    tests/trainables/test_ssl.py -k "cuda or device" 2>&1 | tail -15 | tee "$out/tests_cuda.txt"
echo "gpu-check: done ($out)"
