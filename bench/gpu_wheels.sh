#!/usr/bin/env bash
# Fill the ignored folder .whl/ with the wheels the lent GPU machine lacks (../shared/FIELD-NOTES.md,
# "The GPU machine": Python 3.12, torch 2.11+cu130, nothing fetchable there), for
# bench/gpu_check.sh to install with --no-index.
#
#   bash bench/gpu_wheels.sh
#
# Why these versions: each is the version installed on THIS machine (read from its metadata),
# so the GPU runs the same DeepSpeed, WebDataset and pydantic code the CPU test suite ran here.
# deepspeed is an sdist only (pure Python; its C++/CUDA ops are JIT-built when used, and this
# project uses none on the GPU): it is built into a py3-none-any wheel here. Everything else is
# downloaded as a CPython 3.12 manylinux x86_64 wheel (binary for lmdb and pydantic-core).
# typing-extensions is carried although the GPU machine has one: pydantic-core needs a recent
# one, and a wheel in front on PYTHONPATH costs 45 KiB where an old one there would fail the import.
#
# Our own package is not a wheel: the GPU machine gets the working tree, and gpu_check.sh puts
# the repository root on PYTHONPATH (`python -m introvae_dist.cli`, launchers/train.py and the
# tests all import it from there; no console script `introvae-dist` is needed).
#
# Idempotent: a wheel already in .whl/ for the pinned version is kept. Fails naming the package
# if one cannot be had. Prints the folder's total size: the device tool carries at most 64 MiB
# of working tree and carried folders together.
set -euo pipefail

cd "$(dirname "$0")/.."
WHEELS=.whl
LIMIT_MIB=48  # of the 64 MiB the device tool carries, leave the rest to the working tree
PYTHON=${PYTHON:-python3}

# Downloaded as binaries for the GPU machine's interpreter. Requires-Dist checked with
#   unzip -p .whl/X.whl '*/METADATA' | grep ^Requires-Dist
# deepspeed: einops hjson msgpack ninja numpy packaging psutil py-cpuinfo pydantic torch tqdm;
# webdataset: braceexpand numpy pyyaml; pydantic: annotated-types pydantic-core
# typing-extensions typing-inspection; pydantic-core, typing-inspection: typing-extensions.
# The GPU machine has einops msgpack ninja numpy packaging psutil torch tqdm pyyaml, and the
# matplotlib and tensorboard that RUN/curves.png and RUN/tensorboard/ need (FIELD-NOTES).
DOWNLOADED=(webdataset braceexpand hjson py-cpuinfo lmdb pydantic pydantic-core annotated-types
            typing-inspection typing-extensions)

installed_version() {  # the version of distribution $1 on this machine, or fail naming it
    "$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || {
        echo "bench/gpu_wheels.sh: $1 is not installed here (pip install -e '.[test]' first); nothing to pin it to" >&2
        exit 1
    }
}

have_wheel() {  # whether .whl/ holds a wheel of distribution $1 at version $2
    local stem=${1//-/_}
    compgen -G "$WHEELS/${stem}-$2-*.whl" >/dev/null || compgen -G "$WHEELS/${1}-$2-*.whl" >/dev/null
}

mkdir -p "$WHEELS"

version=$(installed_version deepspeed)
if have_wheel deepspeed "$version"; then
    echo "kept      deepspeed==$version"
else
    "$PYTHON" -m pip wheel -q --no-deps "deepspeed==$version" -w "$WHEELS" || {
        echo "bench/gpu_wheels.sh: building the wheel of deepspeed==$version failed" >&2; exit 1; }
    echo "built     deepspeed==$version"
fi
if ! compgen -G "$WHEELS/deepspeed-$version-py3-none-any.whl" >/dev/null; then
    echo "bench/gpu_wheels.sh: deepspeed==$version did not build as py3-none-any: $(ls "$WHEELS"/deepspeed-*)" >&2
    exit 1
fi

for name in "${DOWNLOADED[@]}"; do
    version=$(installed_version "$name")
    if have_wheel "$name" "$version"; then
        echo "kept      $name==$version"
        continue
    fi
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$name==$version" || {
        echo "bench/gpu_wheels.sh: no CPython 3.12 manylinux x86_64 wheel of $name==$version could be downloaded" >&2
        exit 1
    }
    have_wheel "$name" "$version" || {
        echo "bench/gpu_wheels.sh: pip reported success but .whl/ holds no wheel of $name==$version" >&2; exit 1; }
    echo "fetched   $name==$version"
done

size_kib=$(du -sk "$WHEELS" | cut -f1)
echo "$WHEELS: $(find "$WHEELS" -type f -name '*.whl' | wc -l) wheels, $((size_kib / 1024)) MiB ($size_kib KiB)"
if (( size_kib > LIMIT_MIB * 1024 )); then
    echo "bench/gpu_wheels.sh: $WHEELS is over $LIMIT_MIB MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi
