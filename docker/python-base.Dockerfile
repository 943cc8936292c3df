# What python:3.11-slim is, made from Debian's own packages (bookworm, as that image is): for a
# build machine that reaches Debian's and PyPI's mirrors but no image registry. `make images` (and
# the suite) build the images FROM it there (`--build-arg BASE_IMAGE=localhost/lorafleet-python:3.11`);
# everywhere else they start from python:3.11-slim itself.
#   buildah build --isolation chroot --build-arg DEBIAN=localhost/debian-minbase:bookworm -f docker/python-base.Dockerfile
# DEBIAN: a bookworm root filesystem (`debootstrap --variant=minbase bookworm`, imported; docker/build-images.sh).
ARG DEBIAN=debian:bookworm-slim
FROM ${DEBIAN}

# python:3.11-slim's Python is /usr/local/bin/python with pip and the C headers; here Debian's
# Python 3.11 and its headers, with a virtual environment at /usr/local, which puts python and pip
# first on the PATH as that image does, outside Debian's externally managed site-packages.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /usr/local \
    && ln -sf python3.11 /usr/local/bin/python3 && ln -sf python3 /usr/local/bin/python
ENV LANG=C.UTF-8
CMD ["python3"]
