# Sourced by quickstart.sh and test.sh: a virtualenv with requirements.txt and this
# checkout installed in it (editable), made once. Needs only Python 3.11+; set
# INHERNET_VENV to put the environment elsewhere.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${INHERNET_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
"$py" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
# INHERNET_REQUIREMENTS: more requirement files (relative to the checkout) that the caller
# needs too (test.sh: tests/requirements.txt), installed in the same pip call.
# Each file has a stamp (its sha256): a file is installed again only when it changed.
# One pip call (one resolve), the venv's own pip (no self-upgrade), and no ahead-of-time
# bytecode compilation (--no-compile: Python compiles the modules it imports, once, on
# first import, where writing bytecode is on (test.sh turns it on); precompiling all
# ~17k files of jax, torch and transformers costs ~50 CPU seconds that a test run mostly
# never uses).
stamp_of() { case "$1" in requirements.txt) echo "$venv/.requirements.sha" ;;
  tests/requirements.txt) echo "$venv/.test-requirements.sha" ;; *) echo "$venv/.${1//\//-}.sha" ;; esac; }
todo=()
for req in requirements.txt ${INHERNET_REQUIREMENTS:-}; do
  stamp="$(stamp_of "$req")"
  want="$(sha256sum "$root/$req" | cut -d' ' -f1)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    todo+=("$req")
  fi
done
if [ "${#todo[@]}" -gt 0 ]; then
  echo "Setting up $venv (${todo[*]})..." >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --no-compile "${todo[@]/#/-r$root/}"
  for req in "${todo[@]}"; do
    sha256sum "$root/$req" | cut -d' ' -f1 > "$(stamp_of "$req")"
  done
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
