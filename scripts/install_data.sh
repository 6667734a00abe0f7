#!/usr/bin/env bash
# Installs the real medical images that ship inside Debian and PyPI packages (see shared/DATA.md),
# so tests and the demo have data without any download at run time. Idempotent and quiet: a
# package already present is not installed again. Never copies the images into the repo.
#
# Usage: bash scripts/install_data.sh [--no-stardist]
# Needs root for the Debian packages (CI and the developers' machines run as root).
set -euo pipefail

want_stardist=1
[[ "${1:-}" == "--no-stardist" ]] && want_stardist=0

cache_dir="${MEDSAM2_JAX_CACHE:-$HOME/.cache/medsam2_jax}"
python="${PYTHON:-python3}"

debian_packages=(mricron-data insighttoolkit5-examples invesalius-examples)
missing_debian=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing_debian+=("$package")
done
if (( ${#missing_debian[@]} )); then
  export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${missing_debian[@]}" >/dev/null
fi

python_has() { "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# nilearn is only read for its bundled templates; --no-deps keeps its heavy dependencies out.
python_has nilearn || "$python" -m pip install -qq --root-user-action=ignore --no-deps nilearn
python_has pydicom || "$python" -m pip install -qq --root-user-action=ignore pydicom
python_has data_store || "$python" -m pip install -qq --root-user-action=ignore pydicom-data
python_has tifffile || "$python" -m pip install -qq --root-user-action=ignore tifffile

# stardist's wheel carries 2D/3D nuclei images; importing it would need TensorFlow, so the
# wheel is unzipped and only its tif files are kept.
stardist_dir="$cache_dir/stardist"
if (( want_stardist )) && [[ ! -f "$stardist_dir/data/images/mask2d.tif" ]]; then
  mkdir -p "$cache_dir/wheels" "$stardist_dir"
  "$python" -m pip download -qq --no-deps stardist==0.9.2 -d "$cache_dir/wheels" >/dev/null
  "$python" - "$cache_dir/wheels" "$stardist_dir" <<'PY'
import pathlib, sys, zipfile
wheel = sorted(pathlib.Path(sys.argv[1]).glob("stardist-0.9.2-*.whl"))[0]
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith("stardist/data/") and name.endswith(".tif"):
            archive.extract(name, pathlib.Path(sys.argv[2]).parent)
PY
fi
