#!/usr/bin/env bash
# Sets up and runs the demo: two instances (ports 5000 and 5001) when Redis answers,
# otherwise one instance (port 5000) on the in-memory bus.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

export SECRET_KEY="${SECRET_KEY:-dev-only-secret-shared-by-both-instances}"
export API_KEYS="${API_KEYS:-dev-key}"
base_port="${PORT:-5000}"
unset PORT

redis_url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
if .venv/bin/python - "$redis_url" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
except Exception:
    sys.exit(1)
PY
then
  export REDIS_URL="$redis_url"
  count=2
  echo "webapp: Redis answers at $REDIS_URL: two instances, http://localhost:$base_port and http://localhost:$((base_port + 1))"
else
  unset REDIS_URL
  count=1
  echo "webapp: no Redis at $redis_url: one instance on the in-memory bus, http://localhost:$base_port"
fi
echo "webapp: REST example: curl -X POST localhost:$base_port/api/emit/all -H 'Authorization: Bearer $API_KEYS' -d '{\"event\":\"news\",\"data\":\"hello\"}'"
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/honcho start -f Procfile -c "web=$count" -p "$base_port"
