#!/usr/bin/env bash
# Builds a stand-in for the Dockerfile's base image and tags it with exactly that name, because
# CI machines reach Debian's archive but no container registry. The stand-in is Debian bookworm
# (the official python:3.11-slim-bookworm is built on bookworm too) with Debian's Python 3.11,
# its C headers (the official image carries them too), venv and CA certificates, plus this machine's CA bundle so pip can reach PyPI from inside
# `podman build` through the machine's TLS-inspecting egress.
#
# Usage: build-base-image.sh IMAGE   (e.g. docker.io/library/python:3.11-slim-bookworm)
# Skips the build when IMAGE exists and was built from the same inputs (this script and the
# CA bundle), recorded in a label.
set -euo pipefail

image=${1:?usage: build-base-image.sh IMAGE}
here=$(cd "$(dirname "$0")" && pwd)
suite=bookworm
mirror=http://deb.debian.org/debian
ca_bundle=/etc/ssl/certs/ca-certificates.crt
label=org.aoai-auth-proxy.stand-in-inputs

inputs=$(cat "$here/build-base-image.sh" "$ca_bundle" | sha256sum | cut -c1-16)
if [ "$(podman image inspect --format "{{index .Config.Labels \"$label\"}}" "$image" 2>/dev/null)" = "$inputs" ]; then
    echo "stand-in base $image is up to date ($inputs)"
    exit 0
fi

echo "building stand-in base $image with mmdebstrap ($suite, $mirror)"
# minbase and no documentation keep it near the size of the official slim image; python-is-python3
# gives the `python` command the official image has.
mmdebstrap --quiet --variant=minbase --format=tar \
    --include=python3,python3-venv,python3-dev,python-is-python3,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="copy-in $ca_bundle /etc/ssl/certs" \
    "$suite" - "$mirror" |
    podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "ENV PIP_CERT=$ca_bundle" \
        --change "LABEL $label=$inputs" \
        --change 'CMD ["python3"]' \
        - "$image" >/dev/null
echo "stand-in base $image built ($inputs)"
