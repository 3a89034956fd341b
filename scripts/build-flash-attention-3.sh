#!/usr/bin/env bash
# Builds FlashAttention-3 (Hopper: H100/H200) for what Wan uses -- head dim 128, bf16, no masks,
# windows or paging -- and installs it into the studio's virtual environment. FA3 is not on PyPI;
# its full build takes hours, this subset about 3 minutes on 16 cores (docs/performance.md).
#
#   scripts/build-flash-attention-3.sh [FLASH_ATTENTION_CHECKOUT]     (or: make flash3)
#
# Without a checkout it clones Dao-AILab/flash-attention and its cutlass submodule. Needs nvcc
# (CUDA >= 12.3) and a CUDA build of torch in the environment. PYTHON picks another interpreter.
set -euo pipefail
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || { echo "no Python at $py (run 'make run' once, or set PYTHON)" >&2; exit 2; }
py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"  # absolute, symlink kept (a venv's python is one)
command -v nvcc >/dev/null || [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] || {
  echo "nvcc not found: FlashAttention-3 compiles CUDA code (install the CUDA toolkit, set CUDA_HOME)" >&2; exit 2; }

src=${1:-}
if [ -z "$src" ]; then
  src="$(mktemp -d)/flash-attention"
  git clone --depth 1 https://github.com/Dao-AILab/flash-attention "$src"
  git -C "$src" submodule update --init --depth 1 csrc/cutlass
fi
[ -f "$src/hopper/setup.py" ] || { echo "$src is not a flash-attention checkout (no hopper/setup.py)" >&2; exit 2; }
[ -f "$src/csrc/cutlass/include/cute/tensor.hpp" ] || {
  echo "$src/csrc/cutlass is empty: run 'git submodule update --init csrc/cutlass' there" >&2; exit 2; }

# Only the kernels Wan's attention calls; everything else is switched off at compile time.
for feature in SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 FP8 VARLEN SM80 \
               HDIM64 HDIM96 HDIM192 HDIM256 HDIMDIFF64 HDIMDIFF192; do
  export "FLASH_ATTENTION_DISABLE_$feature=TRUE"
done
export FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-4} NVCC_THREADS=${NVCC_THREADS:-4}
"$py" -m pip install -q wheel ninja packaging
dist="$(mktemp -d)"
(cd "$src/hopper" && "$py" setup.py bdist_wheel -d "$dist")
"$py" -m pip install --force-reinstall --no-deps "$dist"/flash_attn_3-*.whl
"$py" -c "import flash_attn_interface; from diffusers.utils import is_flash_attn_3_available as ok; \
assert ok(), 'diffusers does not see flash_attn_3'; print('FlashAttention-3 installed')"
