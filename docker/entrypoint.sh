#!/usr/bin/env bash
# First start: a cluster whose clients must authenticate with scram-sha-256, the
# superuser's password from POSTGRES_PASSWORD (or the file POSTGRES_PASSWORD_FILE).
# Without a password the container refuses to start rather than trust every host.
set -euo pipefail
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pw=${POSTGRES_PASSWORD:-}
  if [ -z "$pw" ] && [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then pw=$(cat "$POSTGRES_PASSWORD_FILE"); fi
  if [ -z "$pw" ]; then
    echo "exceiver: set POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE); the server does not run without a password" >&2
    exit 1
  fi
  pwfile=$(mktemp); printf '%s\n' "$pw" > "$pwfile"
  /usr/lib/postgresql/15/bin/initdb -D "$PGDATA" -U postgres --pwfile="$pwfile" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --no-locale >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "password_encryption = 'scram-sha-256'" >> "$PGDATA/postgresql.conf"
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "host all all ::/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
fi
exec "$@"
