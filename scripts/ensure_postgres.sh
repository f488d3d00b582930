#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 with a test database (the records
# tests need a real one), like ensure_redis.sh does for Redis:
#   - something already answers on 127.0.0.1:5432: use it;
#   - else install the Debian package `postgresql` if its binaries are missing, and start
#     a throw-away cluster in /tmp/zsi-postgres (trust auth on 127.0.0.1, user postgres;
#     PostgreSQL refuses to run as root, so as the `postgres` OS user when we are root).
# Then create the test database (ZSI_TEST_DB, default zsi_test) if it does not exist.
# Tests read ZSI_TEST_DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/zsi_test).
# ZSI_PG_PORT (5432) and ZSI_PG_DATA (/tmp/zsi-postgres) change the port and the cluster folder.
set -euo pipefail
HOST=127.0.0.1
PORT=${ZSI_PG_PORT:-5432}
DB=${ZSI_TEST_DB:-zsi_test}
DATA=${ZSI_PG_DATA:-/tmp/zsi-postgres}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

pg_bin() {  # newest installed server binaries
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}
answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$HOST" -p "$PORT"
  else
    python3 -c "import socket; socket.create_connection(('$HOST', $PORT), timeout=1)" 2>/dev/null
  fi
}
as_pg() {  # run a command as the OS user that owns the cluster
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if answers; then
  echo "postgres: already answering on $HOST:$PORT"
else
  if [ -z "$(pg_bin)" ]; then
    echo "postgres: installing the Debian package postgresql"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
    # the package may start its own `main` cluster on 5432 (password auth on TCP): stop it,
    # the throw-away cluster below takes the port with trust auth on 127.0.0.1
    if command -v pg_lsclusters >/dev/null 2>&1; then
      pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
        $SUDO pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
      done
    fi
  fi
  BIN=$(pg_bin)
  [ -n "$BIN" ] || { echo "postgres: no server binaries under /usr/lib/postgresql/*/bin" >&2; exit 1; }
  if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir "$DATA" --shell /usr/sbin/nologin postgres
  fi
  mkdir -p "$DATA"
  [ "$(id -u)" -ne 0 ] || chown postgres: "$DATA"
  chmod 700 "$DATA"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 >/dev/null
  fi
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 \
    -o "-c listen_addresses=$HOST -p $PORT -k $DATA -c fsync=off" start >/dev/null
  for _ in $(seq 1 50); do answers && break; sleep 0.2; done
  answers || { echo "postgres: could not start a server on $HOST:$PORT (see $DATA/server.log)" >&2; exit 1; }
  echo "postgres: started ($BIN, data in $DATA)"
fi

# The test database (trust auth as user postgres, as on the CI machines and in the cluster above).
PSQL="psql -h $HOST -p $PORT -U postgres -v ON_ERROR_STOP=1 -qAt"
if ! command -v psql >/dev/null 2>&1; then PSQL="$(pg_bin)/psql -h $HOST -p $PORT -U postgres -v ON_ERROR_STOP=1 -qAt"; fi
if [ "$($PSQL -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != "1" ]; then
  $PSQL -d postgres -c "CREATE DATABASE \"$DB\""
  echo "postgres: created database $DB"
fi
echo "postgres: test database $DB ready (postgresql+psycopg://postgres@$HOST:$PORT/$DB)"
