#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), for scripts/gpu_check.sh.
#
# The GPU machine is offline and has Python 3.12 (manylinux x86_64) with torch, triton, pandas,
# safetensors, tqdm, tabulate, nvidia-ml-py and typing-extensions, but not SQLAlchemy (+ greenlet,
# its C extension on x86_64), platformdirs or psycopg (+ its binary build). Only these are fetched,
# without their dependencies, so nothing the machine already has gets shadowed by another version
# (gpu_check.sh puts them first on PYTHONPATH). Versions default to the ones this checkout is
# tested with; override with SQLALCHEMY_VERSION=... etc.
#
#     bash scripts/fetch_gpu_wheels.sh            # into .whl/
#     bash scripts/fetch_gpu_wheels.sh DIR        # into DIR
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
pkgs=(
    "sqlalchemy==${SQLALCHEMY_VERSION:-2.1.9}"
    "greenlet${GREENLET_VERSION:+==$GREENLET_VERSION}"
    "platformdirs==${PLATFORMDIRS_VERSION:-4.14.8}"
    "psycopg==${PSYCOPG_VERSION:-3.3.9}"
    "psycopg-binary==${PSYCOPG_VERSION:-3.3.9}"
)
mkdir -p "$dest"
"$py" -m pip download --disable-pip-version-check --no-deps --only-binary :all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$dest" "${pkgs[@]}"
# A wheel for another Python or platform would install nowhere: say so now, not on the GPU machine.
for name in sqlalchemy greenlet platformdirs psycopg psycopg_binary; do
    if ! ls "$dest" | grep -qi "^${name}-"; then
        echo "fetch_gpu_wheels: no ${name} wheel in $dest" >&2
        exit 1
    fi
done
ls -l "$dest"
echo "fetch_gpu_wheels: wheels for cp312 manylinux x86_64 are in $dest/"
