#!/usr/bin/env bash
# Creates .venv and installs the project with its test, bench and run extras; quick when nothing changed.
# Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "webapp: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

if [ ! -x .venv/bin/python ]; then
  python=$(pick_python)
  echo "webapp: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
if [ ! -f "$stamp" ]; then
  # The tested set from the lock file, then the project itself: a fresh machine gets exactly
  # what the suite last passed with (scripts/lock.sh regenerates the lock).
  echo "webapp: installing the locked test, bench and run (honcho) dependencies and the project into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.lock
  .venv/bin/python -m pip install --quiet --no-deps -e '.[test,bench,run]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
