# Sourced by quickstart.sh and test.sh: a virtualenv with requirements.txt and this
# checkout installed in it (editable), made once. Needs only Python 3.11+; set
# INHERNET_VENV to put the environment elsewhere.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INHERNET_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
stamp="$venv/.requirements.sha"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Setting up $venv (requirements.txt)..." >&2
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$root/requirements.txt"
  echo "$want" > "$stamp"
fi
# The project itself (pyproject.toml: `import inhernet_jax` anywhere, the inhernet-*
# commands), editable, again whenever pyproject.toml changes. A venv shared by several
# checkouts (INHERNET_VENV) holds one editable install, owned by the checkout that made
# it; any other checkout leaves it alone and goes first on PYTHONPATH instead, so each
# checkout always imports its own tree.
owned="$venv/.project"  # "<sha256 of pyproject.toml> <checkout>"
project="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1) $root"
owner="$(cut -d' ' -f2- "$owned" 2>/dev/null || true)"
if [ ! -f "$owner/pyproject.toml" ] || { [ "$owner" = "$root" ] && [ "$(cat "$owned")" != "$project" ]; }; then
  echo "Installing $root into $venv (editable)..." >&2
  # (Quiet: setuptools warns about every editable install.)
  PYTHONWARNINGS=ignore "$venv/bin/python" -m pip install -q --no-deps --no-index --no-build-isolation -e "$root"
  echo "$project" > "$owned"
  owner="$root"
fi
export PATH="$venv/bin:$PATH"
if [ "$owner" != "$root" ]; then
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$root"
