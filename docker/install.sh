#!/bin/sh
# The install steps of both medseg images, in one place. docker/Dockerfile.cpu and docker/Dockerfile RUN
# this script; tests/test_docker.py runs the CPU image's calls, as written there, in a fresh venv, so the
# steps are proven without a Docker engine.
#
#   sh docker/install.sh PYTHON [SRC [DEST]]
#
#   PYTHON  the interpreter whose pip installs: python in the images, <venv>/bin/python in the test
#   SRC     a folder holding pyproject.toml, README.md, medseg/ and bundles/. Without it only torch is
#           installed (the images do that first, in a layer that source changes leave cached)
#   DEST    bundles/*.json are copied to DEST/bundles (default /opt/medseg), so that
#           `medseg train /opt/medseg/bundles/swin_unetr.json` works from any folder
#
# Environment:
#   TORCH        the torch requirement installed first: default torch==2.13.0 (the Makefile's);
#                keep: install none, PYTHON's own torch must be there and is kept (the CUDA image's)
#   TORCH_INDEX  where it comes from: default https://download.pytorch.org/whl/cpu (the CPU build; a bare
#                `torch` from PyPI pulls GBs of CUDA libraries); empty: pip's own configuration
#
# medseg itself comes from SRC with its dependencies from PyPI; it asks for torch>=2.4, so the torch
# installed first is kept, and this script fails if it was not.
set -eu

if [ $# -lt 1 ] || [ $# -gt 3 ]; then
    echo "usage: $0 PYTHON [SRC [DEST]]" >&2
    exit 2
fi
PY=$1
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
SRC=${2:-}
DEST=${3:-/opt/medseg}
TORCH=${TORCH-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}

pip_install() {
    "$PY" -m pip install --no-cache-dir --disable-pip-version-check "$@"
}
torch_version() {
    "$PY" -c 'import torch; print(torch.__version__)'
}

if [ "$TORCH" = keep ]; then
    if ! torch_version >/dev/null; then
        echo "install.sh: TORCH=keep, but $PY has no torch" >&2
        exit 1
    fi
elif [ -n "$TORCH_INDEX" ]; then
    pip_install --index-url "$TORCH_INDEX" "$TORCH"
else
    pip_install "$TORCH"
fi
torch_before=$(torch_version)
echo "install.sh: torch $torch_before"
[ -n "$SRC" ] || exit 0

for f in pyproject.toml README.md medseg/__init__.py; do
    if [ ! -f "$SRC/$f" ]; then
        echo "install.sh: $SRC/$f is missing; SRC must be a copy of the repository's package sources" >&2
        exit 1
    fi
done
pip_install "$SRC"
torch_after=$(torch_version)
if [ "$torch_after" != "$torch_before" ]; then
    echo "install.sh: installing medseg replaced torch $torch_before with $torch_after" >&2
    exit 1
fi

mkdir -p "$DEST/bundles"
cp "$SRC"/bundles/*.json "$DEST/bundles/"
chmod -R a+rX "$DEST/bundles"

# The installed package, not the sources, answers (SRC is deleted after this in the images).
(cd / && "$PY" -m medseg --version)
