#!/bin/sh
# Build lorafleet's two images with buildah (`make images`): localhost/lorafleet-worker:latest and
# localhost/lorafleet-producer:latest, from the working tree.
#
#   docker/build-images.sh                       # the images as a user builds them: PyPI's CUDA torch
#   TORCH_WHEELS=/opt/wheels docker/build-images.sh   # a folder holding the same torch's CPU wheel
#
# Their base is python:3.11-slim. Where no image registry can be reached (the project's own
# machines reach Debian's and PyPI's mirrors only), the same Python is built from Debian's packages
# once: `debootstrap --variant=minbase bookworm`, imported, then docker/python-base.Dockerfile
# (localhost/lorafleet-python:3.11, kept for the next build). BASE_IMAGE names another base.
#
# What this machine's pip needs to reach its index is handed to the build, never baked into the
# images: PIP_CERT (a CA bundle, as pip reads it from the environment) and TORCH_WHEELS, each
# mounted read-only for the build and named by a build argument (docker/worker.Dockerfile).
set -eu
cd "$(dirname "$0")/.."
WORKER=${WORKER_IMAGE:-localhost/lorafleet-worker:latest}
PRODUCER=${PRODUCER_IMAGE:-localhost/lorafleet-producer:latest}
LOCAL_BASE=localhost/lorafleet-python:3.11
say() { echo "build-images: $*" >&2; }

if ! command -v buildah >/dev/null; then
  [ "$(id -u)" = 0 ] || { say "needs buildah (Debian: apt-get install buildah debootstrap)"; exit 2; }
  say "installing Debian's buildah and debootstrap"
  apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends buildah debootstrap >/dev/null 2>&1 \
    || { apt-get -o DPkg::Lock::Timeout=120 update >/dev/null && \
         apt-get -o DPkg::Lock::Timeout=120 install -y --no-install-recommends buildah debootstrap >/dev/null; }
fi
# The docker format keeps the Dockerfiles' HEALTHCHECK (compose's probe); OCI's has no place for it.
build() { buildah build --isolation chroot --layers --format docker "$@"; }

base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  if buildah inspect --type image python:3.11-slim >/dev/null 2>&1 || buildah pull -q python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base=$LOCAL_BASE
    if ! buildah inspect --type image "$LOCAL_BASE" >/dev/null 2>&1; then
      say "python:3.11-slim cannot be pulled here: building the same from Debian's packages ($LOCAL_BASE)"
      command -v debootstrap >/dev/null || { say "needs debootstrap (Debian: apt-get install debootstrap)"; exit 2; }
      root=$(mktemp -d)
      trap 'rm -rf "$root"' EXIT
      debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
      container=$(buildah from scratch)
      cp -a "$root/." "$(buildah mount "$container")/"
      buildah umount "$container" >/dev/null
      buildah commit -q "$container" localhost/debian-minbase:bookworm >/dev/null
      buildah rm "$container" >/dev/null
      build -q --build-arg DEBIAN=localhost/debian-minbase:bookworm -f docker/python-base.Dockerfile -t "$LOCAL_BASE" . >/dev/null
    fi
  fi
fi

set -- --build-arg "BASE_IMAGE=$base"
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  set -- "$@" --volume "$PIP_CERT:/run/lorafleet-build/ca.crt:ro" --build-arg PIP_CERT=/run/lorafleet-build/ca.crt
fi
if [ -n "${TORCH_WHEELS:-}" ]; then
  set -- "$@" --volume "$(cd "$TORCH_WHEELS" && pwd):/run/lorafleet-build/wheels:ro" \
    --build-arg PIP_FIND_LINKS=/run/lorafleet-build/wheels
fi
say "building $WORKER and $PRODUCER from $base"
build "$@" -f docker/worker.Dockerfile -t "$WORKER" .
build "$@" -f docker/producer.Dockerfile -t "$PRODUCER" .
for image in "$WORKER" "$PRODUCER"; do buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image" >&2; done
