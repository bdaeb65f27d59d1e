#!/usr/bin/env bash
# make cluster / make cluster-stop: a coordinator and two shard servers, three PostgreSQL 15
# clusters on loopback (Unix sockets in $CLUSTER_HOST), each with pgvector and exceiver.
#
#   coordinator  port $CLUSTER_PORT      (default 5491)  .cluster/coord   wal_level=logical
#   shard1       port $CLUSTER_PORT + 1  (default 5492)  .cluster/shard1
#   shard2       port $CLUSTER_PORT + 2  (default 5493)  .cluster/shard2
#
# On the coordinator: postgres_fdw, the foreign servers shard1 and shard2 (options
# extensions 'vector, exceiver' so the planner ships their functions and operators,
# async_capable 'true' so shards are scanned concurrently), user mappings for the OS user
# postgres, and the publication exceiver_models of the model catalog; on each shard the
# subscription exceiver_models_<shard>, so a model trained or imported on the coordinator
# reaches the shards by PostgreSQL's logical replication.
#
# `cluster.sh start [dataset]` also creates the hash-partitioned cell table `pbmc3k` whose
# two partitions live on the shards, loaded with PBMC 3k (and the same cells in the local
# table pbmc3k_local on the coordinator, the single-server reference).
# Idempotent: what exists is kept. `cluster.sh stop` stops the three servers; `cluster.sh
# reset` stops them and removes .cluster/ (after upgrading exceiver).
set -euo pipefail
cd "$(dirname "$0")/.."

PG_CONFIG=${PG_CONFIG:-/usr/bin/pg_config}
PGBIN=$($PG_CONFIG --bindir)
HOST=${CLUSTER_HOST:-/tmp}
PORT=${CLUSTER_PORT:-5491}
ROOT=$PWD/.cluster
DB=exceiver
RUNAS="sudo -u postgres"
export PGOPTIONS="-c client_min_messages=warning"
NAMES=(coord shard1 shard2)

port_of() {
  case $1 in coord) echo "$PORT" ;; shard1) echo $((PORT + 1)) ;; shard2) echo $((PORT + 2)) ;; esac
}
sql() { # sql SERVER [psql args...]
  local p; p=$(port_of "$1"); shift
  "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$p" -U postgres "$@"
}
val() { local s=$1; shift; sql "$s" -d "$DB" -tAc "$@"; }

start_server() {
  local name=$1 dir=$ROOT/$1 p; p=$(port_of "$1")
  local extra=""
  [ "$name" = coord ] && extra="-c wal_level=logical"
  if [ ! -f "$dir/PG_VERSION" ]; then
    mkdir -p "$dir" && chown postgres: "$ROOT" "$dir" && chmod 700 "$dir"
    $RUNAS "$PGBIN/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --no-locale >/dev/null
  fi
  if ! $RUNAS "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
    $RUNAS "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
      -o "-p $p -k $HOST -c listen_addresses='' -c log_line_prefix='%m [%p] %e ' $extra" start >/dev/null || {
      tail -3 "$dir/server.log"; echo "make cluster: $name did not start (is port $p taken? make cluster CLUSTER_PORT=...)"; exit 1; }
  fi
  sql "$name" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1 ||
    sql "$name" -d postgres -c "CREATE DATABASE $DB"
  sql "$name" -d "$DB" -c "SET client_min_messages = warning" -c "CREATE EXTENSION IF NOT EXISTS exceiver CASCADE"
  local n_db n_new
  n_db=$(val "$name" "SELECT count(*) FROM pg_proc WHERE pronamespace = 'exceiver'::regnamespace")
  n_new=$(cat "$($PG_CONFIG --sharedir)"/extension/exceiver--*.sql | grep -c 'CREATE\s*FUNCTION')
  if [ "$n_db" != "$n_new" ]; then
    echo "make cluster: $name holds an older build of exceiver ($n_db functions; the installed one has $n_new)."
    echo "              'make cluster-reset' removes the three servers (and their models and tables) and builds them afresh."
    exit 1
  fi
}

stop_all() {
  for n in "${NAMES[@]}"; do
    [ -f "$ROOT/$n/PG_VERSION" ] && $RUNAS "$PGBIN/pg_ctl" -D "$ROOT/$n" -m fast stop >/dev/null 2>&1 || true
  done
  echo "cluster stopped"
}

wire() {
  # foreign servers and user mappings on the coordinator
  sql coord -d "$DB" <<SQL
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS postgres_fdw;
DO \$\$
DECLARE s text;
BEGIN
  FOREACH s IN ARRAY ARRAY['shard1', 'shard2'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_foreign_server WHERE srvname = s) THEN
      EXECUTE format('CREATE SERVER %I FOREIGN DATA WRAPPER postgres_fdw OPTIONS '
                     '(host %L, port %L, dbname %L, extensions %L, async_capable %L, fetch_size %L, batch_size %L)',
                     s, '$HOST', CASE s WHEN 'shard1' THEN '$((PORT + 1))' ELSE '$((PORT + 2))' END, '$DB',
                     'vector, exceiver', 'true', '1000', '100');
      EXECUTE format('CREATE USER MAPPING FOR postgres SERVER %I OPTIONS (user %L)', s, 'postgres');
    END IF;
  END LOOP;
  IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'exceiver_models') THEN
    CREATE PUBLICATION exceiver_models FOR TABLE exceiver.model_catalog;
  END IF;
END
\$\$;
SQL
  # a subscription on each shard (CREATE SUBSCRIPTION cannot run in a DO block)
  for s in shard1 shard2; do
    if [ -z "$(val "$s" "SELECT 1 FROM pg_subscription WHERE subname = 'exceiver_models_$s'")" ]; then
      sql "$s" -d "$DB" -c "CREATE SUBSCRIPTION exceiver_models_$s CONNECTION 'host=$HOST port=$PORT dbname=$DB user=postgres' PUBLICATION exceiver_models WITH (slot_name = 'exceiver_models_$s')"
    fi
  done
}

# The sharded cell table NAME: a partition NAME_p0 on shard1 and NAME_p1 on shard2, hash on
# cell_id; the columns of the local table NAME_local (a load_10x table) plus `embedding`.
shard_table() {
  local t=$1
  local cols
  cols=$(val coord "SELECT string_agg(format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum)
                    FROM pg_attribute WHERE attrelid = '${t}_local'::regclass AND attnum > 0 AND NOT attisdropped")
  local i=0
  for s in shard1 shard2; do
    sql "$s" -d "$DB" -c "CREATE TABLE IF NOT EXISTS ${t}_p$i ($cols, PRIMARY KEY (cell_id))"
    i=$((i + 1))
  done
  if [ -z "$(val coord "SELECT 1 FROM pg_class WHERE relname = '$t' AND relkind = 'p'")" ]; then
    sql coord -d "$DB" \
      -c "CREATE TABLE $t ($cols) PARTITION BY HASH (cell_id)" \
      -c "CREATE FOREIGN TABLE ${t}_p0 PARTITION OF $t FOR VALUES WITH (MODULUS 2, REMAINDER 0) SERVER shard1 OPTIONS (schema_name 'public', table_name '${t}_p0')" \
      -c "CREATE FOREIGN TABLE ${t}_p1 PARTITION OF $t FOR VALUES WITH (MODULUS 2, REMAINDER 1) SERVER shard2 OPTIONS (schema_name 'public', table_name '${t}_p1')"
  fi
  if [ "$(val coord "SELECT count(*) FROM $t")" = 0 ]; then
    sql coord -d "$DB" -c "INSERT INTO $t SELECT * FROM ${t}_local"
  fi
}

case ${1:-start} in
  start)
    for n in "${NAMES[@]}"; do start_server "$n"; done
    wire
    # PBMC 3k, loaded on the coordinator and spread over the shards
    if [ -z "$(val coord "SELECT 1 FROM pg_class WHERE relname = 'pbmc3k_local'")" ]; then
      sql coord -d "$DB" -c "SET client_min_messages = warning" -c "SELECT cells FROM exceiver.load_10x('$PWD/data/pbmc3k', 'pbmc3k_local')" >/dev/null
    fi
    shard_table pbmc3k
    echo "cluster ready: coordinator psql -h $HOST -p $PORT -U postgres $DB; shards on ports $((PORT + 1)), $((PORT + 2))"
    echo "  pbmc3k: $(val shard1 'SELECT count(*) FROM pbmc3k_p0') cells on shard1, $(val shard2 'SELECT count(*) FROM pbmc3k_p1') on shard2"
    ;;
  stop) stop_all ;;
  reset) stop_all; rm -rf "$ROOT"; echo "removed $ROOT" ;;
  *) echo "usage: cluster.sh start|stop|reset" >&2; exit 2 ;;
esac
