#!/usr/bin/env bash
# Runs the tests that touch libraries' internals (the private hooks, the transport, the bus, the
# manager and the cluster tests) against the newest releases of those libraries, ignoring the pins
# and the lock. Green: a pin may move (update pyproject.toml, then scripts/lock.sh). Red: an
# override must change first. Not part of CI: the newest releases change under it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh  # Redis, Chromium and the JS clients are the main suite's; this needs only Redis
venv=.venv-latest
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -r requirements.lock
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -m pip install --quiet --upgrade python-socketio python-engineio redis hypercorn quart quart-auth
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(python-socketio|python-engineio|redis|hypercorn|quart|quart-auth) '
exec "$venv/bin/python" -m pytest tests/test_private_hooks.py tests/test_transport.py tests/test_replay.py \
  tests/test_polling.py tests/test_cluster.py tests/test_rooms.py "$@"
