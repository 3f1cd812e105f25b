#!/usr/bin/env bash
# Wheels for what `benchmarks/device_check.sh` needs beyond the device image (the HTTP stack of `arpo serve`),
# for the image's Python (3.12, x86-64), into .whl/ (git-ignored; name it in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
rm -rf .whl && mkdir -p .whl
python -m pip download -q --dest .whl --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    fastapi uvicorn pydantic httptools
du -sh .whl
