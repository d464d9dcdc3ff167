#!/usr/bin/env bash
# Re-resolves the dependencies of pyproject.toml into requirements.lock (everything the tests,
# the bench and scripts/run.sh need) and requirements.txt (runtime only, for buildpacks).
# Run it after changing pyproject.toml, then run ./scripts/test.sh before committing both.
# Packages already locked keep their versions (only new ones are resolved); `--upgrade`
# re-resolves everything to the newest releases the bounds allow.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keep=()
if [ "${1:-}" != "--upgrade" ] && [ -f requirements.lock ]; then
  grep -v '^#' requirements.lock > "$work/constraints.txt"
  keep=(-c "$work/constraints.txt")
fi
for kind in lock run; do
  "$python" -m venv "$work/$kind"
  "$work/$kind/bin/python" -m pip install --quiet --upgrade pip
done
"$work/lock/bin/python" -m pip install --quiet "${keep[@]}" '.[test,bench,run]'
"$work/run/bin/python" -m pip install --quiet "${keep[@]}" .
{
  echo "# The tested set: runtime, test, bench and run dependencies, exactly as the suite last passed."
  echo "# scripts/setup.sh installs from it; regenerate with scripts/lock.sh after changing pyproject.toml."
  "$work/lock/bin/python" -m pip freeze --exclude webapp
} > requirements.lock
{
  echo "# Runtime dependencies only, pinned to the tested set: what a platform buildpack installs"
  echo "# (Heroku's Python buildpack reads requirements.txt). Regenerate with scripts/lock.sh."
  "$work/run/bin/python" -m pip freeze --exclude webapp
} > requirements.txt
echo "webapp: wrote requirements.lock and requirements.txt"
