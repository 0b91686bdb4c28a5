#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks to import loratk and run benchmarks/gpu_suite.py.
#
#   bash benchmarks/gpu_wheels.sh [DIR]      # default DIR: .gpu-wheels (git-ignored), about 8 MB
#
# Run it on a machine that reaches PyPI. The GPU machine runs Python 3.12 (x86_64) with torch, transformers,
# peft, accelerate, safetensors, torchmetrics, matplotlib, requests and typing-extensions, but no diffusers,
# pydantic or tomli-w, and reaches no package index. `gpu_suite.py --install DIR` installs these wheels there
# with `pip install --no-index --no-deps` (each one only where the machine has no newer version) and checks
# that loratk imports before it measures anything.
#
# datasets is left out on purpose: only `loratk.data.captions` imports it (lazily, to read caption
# manifests), and the suite never reaches that code.
#
# Versions are the tested set in constraints.txt. Override the target with GPU_PYTHON=3.11 (for a local
# rehearsal in a Python 3.11 venv) or PIP="python3.12 -m pip".
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-"$repo/.gpu-wheels"}
python_version=${GPU_PYTHON:-3.12}
pip=${PIP:-python3 -m pip}

# What loratk needs beyond the GPU machine's image. typing_extensions is there already, but pydantic needs
# >= 4.16, newer than some images hold; the install step skips it where the machine's is as new.
packages=(diffusers pydantic pydantic_core annotated-types typing-inspection tomli_w typing_extensions)

pins=()
for name in "${packages[@]}"; do
    # constraints.txt spells names as pip freeze does; match `-`, `_` and case alike.
    pattern=$(printf '%s' "$name" | sed 's/[-_]/[-_]/g')
    pin=$(grep -i -E "^${pattern}==" "$repo/constraints.txt" || true)
    if [[ -z "$pin" ]]; then
        echo "error: $name has no pin in constraints.txt; add one (the tested version) and rerun" >&2
        exit 2
    fi
    pins+=("$pin")
done

mkdir -p "$dir"
rm -f "$dir"/*.whl
# pip matches each manylinux tag exactly: name the common ones (pydantic_core ships manylinux_2_17).
$pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "${pins[@]}"

count=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
if [[ "$count" -ne "${#pins[@]}" ]]; then
    echo "error: expected ${#pins[@]} wheels in $dir, found $count" >&2
    exit 1
fi
size_kib=$(du -sk "$dir" | cut -f1)
if [[ "$size_kib" -gt $((60 * 1024)) ]]; then
    echo "error: $dir holds ${size_kib} KiB, over the 60 MiB that may travel with the working tree" >&2
    exit 1
fi
ls -1 "$dir"
echo "$count wheels for Python $python_version in $dir: $((size_kib / 1024)) MiB (${size_kib} KiB)"
