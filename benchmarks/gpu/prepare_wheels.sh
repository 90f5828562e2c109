#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu/run.py needs on a GPU machine without internet
# (Python 3.12, x86-64 Linux, with PyTorch+CUDA, numpy, OpenCV, Pillow, onnx and
# nvidia-ml-py already installed). Run it here, where PyPI is reachable, from anywhere:
#
#     bash benchmarks/gpu/prepare_wheels.sh [DEST]      # DEST defaults to .whl (git-ignored)
#
# then carry DEST to the GPU machine and install there as benchmarks/gpu/README.md says.
# The list is splitserve's runtime dependencies and theirs, minus what that machine has
# (numpy, protobuf come with torch and onnx), pinned to the
# versions the test suite runs with. --no-deps: every needed package is named here.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}

PACKAGES=(
    # the transport, the headers, the HTTP front
    pyzmq==27.3.0
    msgspec==0.22.0
    starlette==1.10.0
    anyio==4.16.0
    idna==3.20
    uvicorn==0.54.0
    click==8.5.1
    h11==0.16.0
    uvloop==0.23.0
    httptools==0.9.0
    typing_extensions==4.16.0  # anyio 4.16 needs >= 4.16; the machine's may be older
    # the load generator's client
    aiohttp==3.14.5
    aiohappyeyeballs==2.7.1
    aiosignal==1.4.0
    attrs==26.1.0
    frozenlist==1.8.0
    multidict==7.2.1
    propcache==0.5.4
    yarl==1.25.1
    # splitserve's default engine (not used by the vision service; a declared dependency)
    onnxruntime==1.32.0
    flatbuffers==25.12.19
    packaging==26.4
)

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
    echo "expected ${#PACKAGES[@]} wheels in $DEST, found $count (an old version left there?)" >&2
    exit 1
fi
du -sh "$DEST"
ls "$DEST"
