#!/usr/bin/env bash
# Sets up everything the tests need (venv, Redis, Chromium, node clients) and runs the whole suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

redis_answers() { .venv/bin/python -c 'import redis; redis.Redis(socket_connect_timeout=1).ping()' 2>/dev/null; }
# The fault, TLS and cluster tests start redis-servers of their own (redis-cli builds the cluster;
# openssl makes the TLS test's certificates), even when a Redis already answers on 6379.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  echo "webapp: installing redis-server, redis-tools and openssl"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools openssl >/dev/null
fi
# The clock tests (tests/test_clocks.py) run instances behind Redis's clock with libfaketime.
if ! command -v faketime >/dev/null 2>&1; then
  echo "webapp: installing faketime for the clock tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null
fi
if ! redis_answers; then
  echo "webapp: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/webapp-ci-redis.log
  for _ in $(seq 50); do redis_answers && break; sleep 0.1; done
  redis_answers || { echo "webapp: redis-server did not start" >&2; exit 1; }
fi

# The browser tests drive Debian's Chromium (Playwright cannot download browsers here).
if [ ! -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  echo "webapp: installing chromium for the browser tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

# The load-balancer test serves three instances through deploy/nginx.conf with Debian's nginx.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "webapp: installing nginx-light for the load-balancer test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  # The package may start its default site on port 80; the test runs its own nginx, on loopback.
  /usr/sbin/nginx -s quit 2>/dev/null || true
fi

# The recovery tests drive the official Socket.IO JavaScript client (tests/js, pinned by its lockfile).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "webapp: installing nodejs and npm for the JavaScript client tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# ... and the bench's Node reference app (bench/reference), which its smoke test runs.
for js in tests/js bench/reference; do
  js_stamp=$js/node_modules/.installed-from-lock
  if [ ! -f "$js_stamp" ] || [ $js/package-lock.json -nt "$js_stamp" ]; then
    echo "webapp: installing the JavaScript packages of $js (npm ci)"
    npm ci --prefix $js --no-audit --no-fund --silent
    touch "$js_stamp"
  fi
done

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "webapp: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$status"
