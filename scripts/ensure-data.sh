#!/bin/sh
# Make sure the real Fashion-MNIST is on this machine: Debian's package dataset-fashion-mnist.
set -eu
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ] && [ -f "$dir/t10k-labels-idx1-ubyte.gz" ]; then
    exit 0
fi
if [ -n "${FEDMUTUAL_DATA:-}" ] && ls "$FEDMUTUAL_DATA"/*train-images* >/dev/null 2>&1; then
    exit 0
fi
echo "Fashion-MNIST is missing; installing Debian's package dataset-fashion-mnist ..."
if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO=none; fi
if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then
    cat >&2 <<MSG
error: cannot install Fashion-MNIST automatically (needs apt-get and root or sudo).
Install it with:   sudo apt-get install dataset-fashion-mnist
or download the four IDX files from https://github.com/zalandoresearch/fashion-mnist
into a directory and set FEDMUTUAL_DATA to it (or pass --data-dir, or --download).
MSG
    exit 1
fi
$SUDO apt-get update -qq >/dev/null || true
if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "error: apt-get install dataset-fashion-mnist failed; install it by hand or set FEDMUTUAL_DATA" >&2
    exit 1
fi
echo "Fashion-MNIST installed in $dir"
