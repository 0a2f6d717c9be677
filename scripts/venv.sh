# Sourced by scripts/serve and scripts/test: create .venv from pyproject.toml once, and
# again whenever pyproject.toml changes. Usage: ensure_venv [EXTRAS]   (e.g. "test")
ensure_venv() {
  local extras=${1:-}
  venv=${KEYBROKER_VENV:-.venv}
  local spec="." stamp
  [ -n "$extras" ] && spec=".[$extras]"
  stamp="$venv/.installed-${extras:-base}-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "setting up $venv ($spec) ..." >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$spec"
    touch "$stamp"
  fi
}
