#!/bin/sh
# Install lorafleet into a Python environment as the images do and as the test suite was tested:
# the pinned torch first (the one line `torch==` in docker/constraints.txt; PyPI's build brings
# CUDA on a GPU host, the CPU file here), then the project with its extras, every package held to
# the versions in docker/constraints.txt (the versions `make test` passed with).
#   docker/install-python.sh PIP PROJECT [PIP OPTIONS...]
#   e.g. docker/install-python.sh pip ".[worker,s3]" --no-cache-dir   (worker.Dockerfile)
#        docker/install-python.sh .venv/bin/pip -e ".[worker,s3,report,test,docs]"   (make install)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
pip=$1
shift
project=$1
shift
editable=
if [ "$project" = "-e" ]; then editable=-e; project=$1; shift; fi
torch=$(grep -m1 '^torch==' "$here/constraints.txt")
"$pip" install --progress-bar off "$@" -c "$here/constraints.txt" "$torch"
# shellcheck disable=SC2086  # $editable is empty or -e
"$pip" install --progress-bar off "$@" -c "$here/constraints.txt" $editable "$project"
