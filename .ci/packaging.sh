#!/usr/bin/env bash
# CI, packaging: the sdist carries what the extension is built from, a wheel built from it holds every
# subpackage and the compiled kernels, and that wheel, installed in a second clean virtualenv, works from
# a folder outside the checkout; a plain `pip install` of the sdist (build isolation, torch not visible)
# gives the working pure-torch package and says how to get the kernels. Run from the repository root with the first virtualenv active (the one
# the README's install command made), so the extension is built against its torch.
# Usage: .ci/packaging.sh TORCH_PIN   e.g. .ci/packaging.sh torch==2.13.0
set -euo pipefail
torch_pin=${1:?usage: .ci/packaging.sh TORCH_PIN}
top=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "CI packaging: sdist"
pip install -q build
python -m build --sdist --no-isolation --outdir "$work/dist" . > "$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/*.tar.gz)
listing=$(tar -tzf "$sdist")
for f in csrc/ops.cpp csrc/persample_common.h csrc/cpu/persample.cpp csrc/cuda/persample.cu \
         landscape_kernels/kernels/schemas.def setup.py; do
  grep -q "/$f\$" <<< "$listing" || { echo "CI packaging: the sdist lacks $f"; exit 1; }
done

echo "CI packaging: a wheel built from the sdist (the extension compiled against this venv's torch)"
MAX_JOBS=2 pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$sdist" > "$work/wheel.log" 2>&1 \
  || { cat "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/wheel/*.whl)
python - "$wheel" <<'EOF'
import sys
import zipfile

from setuptools import find_packages

names = zipfile.ZipFile(sys.argv[1]).namelist()
packages = find_packages(include=["landscape_kernels", "landscape_kernels.*"])
missing = [p for p in packages if p.replace(".", "/") + "/__init__.py" not in names]
extras = [n for n in ("landscape_kernels/kernels/schemas.def",) if n not in names]
compiled = [n for n in names if n.startswith("landscape_kernels/kernels/_C") and n.endswith(".so")]
if missing or extras or not compiled:
    sys.exit(f"CI packaging: the wheel lacks packages {missing}, files {extras} or the compiled extension ({compiled})")
print(f"CI packaging: the wheel holds {len(packages)} packages, schemas.def and {compiled[0]}")
EOF

echo "CI packaging: the wheel in a second clean virtualenv, used from outside the checkout"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$torch_pin" numpy scipy scikit-learn matplotlib tqdm
"$work/venv/bin/pip" install -q --no-deps "$wheel"
mkdir -p "$work/elsewhere"
cd "$work/elsewhere"
"$work/venv/bin/landscape-kernels" info | tee "$work/info.txt"
grep -q "extension:        loaded" "$work/info.txt" || { echo "CI packaging: the installed wheel's kernels did not load"; exit 1; }
"$work/venv/bin/python" -c "import landscape_kernels, os, sys; sys.exit(0 if not landscape_kernels.__file__.startswith('$top') else 'CI packaging: imported the checkout, not the wheel')"
"$work/venv/bin/landscape-kernels" reproduce variance-flatness --quick --no-progress --out "$work/elsewhere/vf" | tail -1
test -s "$work/elsewhere/vf/report.md" && test -s "$work/elsewhere/vf/summary.json"

echo "CI packaging: a plain 'pip install' of the sdist (pip's build isolation: the pure-torch package)"
python3 -m venv "$work/plain"
"$work/plain/bin/pip" install -q "$torch_pin" numpy scipy
"$work/plain/bin/pip" install -q "$sdist" > "$work/plain.log" 2>&1 || { cat "$work/plain.log"; exit 1; }
"$work/plain/bin/landscape-kernels" info | tee "$work/plain_info.txt"
grep -q "no-build-isolation" "$work/plain_info.txt" || { echo "CI packaging: info does not say how to get the kernels"; exit 1; }
"$work/plain/bin/python" -c "import torch, landscape_kernels as lk; g = lk.ops.per_sample_gram(torch.randn(5, 3), torch.randn(5, 2)); assert g.shape == (5, 5)"
cd "$top"
echo "CI packaging: done"
