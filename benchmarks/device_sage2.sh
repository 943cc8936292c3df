# SageAttention 2's SM90 kernel (INT8 Q·K, FP8 P·V; thu-ml/SageAttention), built on the GPU machine
# lent through `device` (offline, nvcc there; see DOMAIN.md's last section), then measured.
#
# Here, once, with network:   bash benchmarks/device_sage2.sh --fetch [MIRROR]
#   packs the source (from a local clone: MIRROR, e.g. what the library's `fetch` brought) and the
#   build tools the machine lacks (setuptools, wheel, ninja) into .sage2/ (ignored by git).
# There, in one run (`carry: [".whl", ".sage2"]`):
#   source benchmarks/device_setup.sh && bash benchmarks/device_sage2.sh
#   builds only what a CogVideoX step calls, so the build fits a run: the SM90 extension and the
#   quantizing kernels, for head dim 64, non-causal, per-thread INT8 granularity, no LSE (the other
#   cases throw); the wheel lands in $OUT, then attention_kernels.py times it beside torch's kernels,
#   alone and in a whole 5B step (its `sageattn` rows).
SAGE2=${SAGE2:-.sage2}
if [ "${1:-}" = "--fetch" ]; then
  set -e
  mirror=${2:?the path of a SageAttention clone}
  mkdir -p "$SAGE2"
  git -C "$mirror" archive --format=tar.gz -o "$PWD/$SAGE2/src.tar.gz" HEAD setup.py pyproject.toml LICENSE csrc sageattention
  git -C "$mirror" log -1 --format='%H' > "$SAGE2/commit"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi none --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 --platform any -d "$SAGE2" "setuptools==74.1.3" "wheel==0.43.0" "ninja==1.13.0"
  du -sh "$SAGE2"
  exit 0
fi
set -e
started=$(date +%s)
nvcc --version | tail -1
python3 -m pip install -q --no-index --no-deps --target /tmp/sage2-tools "$SAGE2"/*.whl
export PYTHONPATH="/tmp/sage2-tools:$PYTHONPATH" PATH="/tmp/sage2-tools/bin:$PATH"
rm -rf /tmp/sage2 && mkdir -p /tmp/sage2 && tar -C /tmp/sage2 -xzf "$SAGE2/src.tar.gz"
echo "SageAttention $(cat "$SAGE2/commit")" > /tmp/sage2/README.md  # setup.py reads it for the description
python3 - /tmp/sage2 <<'PY'
import re, sys
root = sys.argv[1]
# Each dispatch keeps the one case a CogVideoX step takes; the others throw "Unsupported".
path = f"{root}/csrc/dispatch_utils.h"
text = open(path).read()
for pattern, keep in (
    (r"\}\s*else if \(head_dim == 128\) \{.*?(?=\}\s*else)", ""),
    (r"if \(is_causal == 1\) \{.*?\}\s*else if \(is_causal == 0\)", "if (is_causal == 0)"),
    (r"if \(qk_quant_gran == 2\) \{.*?\}\s*else if \(qk_quant_gran == 3\)", "if (qk_quant_gran == 3)"),
    (r"if \(return_lse == 1\) \{.*?\}\s*else if \(return_lse == 0\)", "if (return_lse == 0)"),
):
    text, n = re.subn(pattern, keep, text, count=1, flags=re.S)
    assert n == 1, pattern
open(path, "w").write(text)
# Only the SM90 extension and the quantizing one (the SM80/SM89 ones serve other GPUs).
path = f"{root}/setup.py"
text = open(path).read()
for condition in (
    "if HAS_SM80 or HAS_SM86 or HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121",
    "if HAS_SM89 or HAS_SM90 or HAS_SM100 or HAS_SM120 or HAS_SM121",
):
    assert condition in text, condition
    text = text.replace(condition, f"if False and ({condition.removeprefix('if ')})", 1)
open(path, "w").write(text)
PY
mkdir -p "${OUT:-/tmp/sage2-out}"
(cd /tmp/sage2 && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 EXT_PARALLEL=2 \
  python3 -m pip wheel -q --no-build-isolation --no-deps -w "${OUT:-/tmp/sage2-out}" . 2>&1 | grep -v "ptxas info\|bytes stack frame\|^ *$" | tail -20)
python3 -m pip install -q --no-index --no-deps --target /tmp/site "${OUT:-/tmp/sage2-out}"/sageattention-*.whl
echo "device_sage2: SageAttention $(cat "$SAGE2/commit" | cut -c1-8) built and installed in $(( $(date +%s) - started )) s"
