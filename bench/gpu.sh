#!/usr/bin/env bash
# The GPU benchmark set (issue 13 §2) in one command, on a machine with an NVIDIA GPU:
#
#   pip install -e ".[cuda12,torch]" torch==2.14.1 torchvision==0.29.1
#   bash bench/gpu.sh [OUT_DIR]        # OUT_DIR (default bench-gpu-<date>) gets one table per part
#
# Every part compares jaxvpr on JAX's GPU backend with PyTorch on the same GPU, in the same process,
# interleaved round by round (bench/inference.py, bench/train_step.py):
#   inference      CosPlace ResNet-18/50 descriptors, fp32
#   step_fp32      CosPlace step at 512 x 32: layer3+layer4 (frozen), all stages, + GRL, + augmentation
#                  in the step (jaxvpr data.augment_on="device"; PyTorch: CosPlace's per-image transforms
#                  on the GPU); PyTorch channels-last
#   step_bf16      the same in bf16: jaxvpr train.mixed_precision vs PyTorch autocast (AMP), channels-last
#   input          the host's share with the augmentation on the device (decode + batching of 512²
#                  JPEGs, bench/pipeline.py), to compare with the step's images/s: the step is
#                  input-bound if the host delivers fewer images/s than the step consumes
# ROUNDS (default 10) and ITERS (default 3) set the timing; ROWS the step rows.
set -euo pipefail
out=${1:-bench-gpu-$(date +%Y%m%d-%H%M)}
rounds=${ROUNDS:-10}
iters=${ITERS:-3}
rows=${ROWS:-frozen:512:32 all:512:32 grl:512:32 devaug:512:32}
python=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)

"$python" - <<'PY'
import sys
import jax
import torch
if jax.devices()[0].platform != "gpu" or not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh needs a GPU for both frameworks: JAX sees {jax.devices()[0].platform}, "
             f"torch.cuda.is_available() = {torch.cuda.is_available()} "
             '(pip install -e ".[cuda12,torch]" on a machine with an NVIDIA GPU).')
print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
      f"{torch.cuda.get_device_name()}")
PY
mkdir -p "$out"
part() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.txt"
}
# shellcheck disable=SC2086  # $rows: one argument per row
part inference "$python" "$here/inference.py" --torch-device cuda --rounds "$rounds" --iters "$iters" --rows \
  cosplace_resnet18_512:512:32 cosplace_resnet50_2048:512:32 cosplace_resnet50_2048:224:64
part step_fp32 "$python" "$here/train_step.py" --torch-device cuda --channels-last --precision fp32 \
  --rounds "$rounds" --iters "$iters" --no-profile --rows $rows
part step_bf16 "$python" "$here/train_step.py" --torch-device cuda --channels-last --precision bf16 \
  --rounds "$rounds" --iters "$iters" --no-profile --rows $rows
part input "$python" "$here/pipeline.py" --batches 5 --rounds 2 --workers 0 8
echo "tables in $out/"
