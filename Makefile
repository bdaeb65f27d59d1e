# exceiver: the front door. `make demo` and `make test` each do the whole set-up first.
#
#   make install   set-up, release build, install into the system PostgreSQL 15
#   make db        a local PostgreSQL 15 cluster (OS user postgres), extension created
#   make db-reset  drop the database and create it afresh (after upgrading exceiver)
#   make db-stop   stop it
#   make psql      a psql session in it
#   make demo      the end-to-end demo on the real data in data/ (outputs in out/demo/)
#   make demo-publish  copy out/demo/ to results/ (the copies the README links)
#   make test      every test layer: core cargo tests, #[pg_test]s, pg_regress golden files,
#                  a Python client (psycopg + pgvector, in .venv-client), the sharded cluster
#   make cluster   a coordinator and two shards on this machine (README, Scaling out); cluster-stop
#   make scale     load/embed/index/search/train at SCALE_CELLS cells (default 10^6; not part of test)
#   make bench     the embedding benchmark (see README)
#   make soak      16 concurrent sessions for 4 minutes; results in out/soak/ (not part of test)
#   make fuzz      every reader of user bytes under libFuzzer; results in out/fuzz/ (not part of test)
#   make cuda      the cuda variant (GPU benchmark and extension library) into target/cuda,
#                  built without a GPU from PyPI's CUDA 13 wheels (README, section GPU); not part of test
#   make pg-bundle PostgreSQL 15 + pgvector + exceiver (the cuda build when make cuda made one)
#                  packed for a GPU machine without PostgreSQL (target/pgbundle; scripts/gpu_pg.sh)
#   make pg-bundle-check  that bundle on a throwaway cluster here, exceiver.device = 'cpu'

PG_CONFIG ?= /usr/bin/pg_config
PGBIN     := $(shell $(PG_CONFIG) --bindir 2>/dev/null)
PGXS_DIR  := $(shell dirname $$($(PG_CONFIG) --pgxs 2>/dev/null) 2>/dev/null)
SHAREDIR  := $(shell $(PG_CONFIG) --sharedir 2>/dev/null)
PGPORT    ?= 5488
PGHOST    ?= /tmp
PGUSER    := postgres
DB        ?= exceiver
PGDATA    := $(CURDIR)/.pgdata
TESTDATA  := $(CURDIR)/.pgtest
RUNAS     := sudo -u $(PGUSER)
PSQL      := $(PGBIN)/psql -X -h $(PGHOST) -p $(PGPORT) -U $(PGUSER)
DEMO_OUT  ?= out/demo
REGRESS   := $(basename $(notdir $(wildcard tests/pg_regress/sql/*.sql)))

.PHONY: setup install db db-reset db-stop psql demo demo-publish soak fuzz errors test test-core test-pg test-regress test-client test-cluster cluster cluster-stop cluster-reset cluster-bench bench cuda pg-bundle pg-bundle-check fmt check-access scale

setup:
	bash scripts/setup.sh

install: setup
	cargo pgrx install --release --pg-config $(PG_CONFIG)

db: install
	@if [ ! -f $(PGDATA)/PG_VERSION ]; then \
	  mkdir -p $(PGDATA) && chown $(PGUSER): $(PGDATA) && chmod 700 $(PGDATA) && \
	  $(RUNAS) $(PGBIN)/initdb -D $(PGDATA) -U $(PGUSER) --auth=trust -E UTF8 --no-locale >/dev/null; fi
	@if ! $(RUNAS) $(PGBIN)/pg_ctl -D $(PGDATA) status >/dev/null 2>&1; then \
	  $(RUNAS) $(PGBIN)/pg_ctl -D $(PGDATA) -l $(PGDATA)/server.log -w \
	    -o "-p $(PGPORT) -k $(PGHOST) -c listen_addresses=''" start >/dev/null || { \
	    tail -3 $(PGDATA)/server.log; echo "make db: the server did not start (is port $(PGPORT) taken? make db PGPORT=...)"; exit 1; }; fi
	@[ "$$($(PSQL) -d postgres -tAc 'SHOW log_line_prefix')" = '%m [%p] %e ' ] || \
	  $(PSQL) -d postgres -qc "ALTER SYSTEM SET log_line_prefix = '%m [%p] %e '" -c "SELECT pg_reload_conf()" >/dev/null
	@$(PSQL) -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$(DB)'" | grep -q 1 || \
	  $(PSQL) -d postgres -qc "CREATE DATABASE $(DB)"
	@$(PSQL) -d $(DB) -qc "CREATE EXTENSION IF NOT EXISTS exceiver CASCADE"
	@n_db=$$($(PSQL) -d $(DB) -tAc "SELECT count(*) FROM pg_proc WHERE pronamespace = 'exceiver'::regnamespace"); \
	  n_new=$$(cat $(SHAREDIR)/extension/exceiver--*.sql | grep -c 'CREATE\s*FUNCTION'); \
	  if [ "$$n_db" != "$$n_new" ]; then \
	    echo "make db: database '$(DB)' holds an older build of exceiver ($$n_db functions; the installed one has $$n_new)."; \
	    echo "         'make db-reset' drops database '$(DB)' (and the models in it) and creates it afresh."; exit 1; fi
	@echo "database '$(DB)' ready: psql -h $(PGHOST) -p $(PGPORT) -U $(PGUSER) $(DB)  (or: make psql)"

# The server (OS user postgres) reads data/ and fixtures/ in tests and the demo: make
# sure it can, wherever the repository was cloned.
check-access:
	@sudo -u $(PGUSER) test -r $(CURDIR)/fixtures/meta.json -a -r $(CURDIR)/data/pbmc3k/barcodes.tsv.gz || { \
	  d=$(CURDIR); while [ "$$d" != / ]; do chmod o+x "$$d"; d=$$(dirname "$$d"); done; \
	  chmod -R o+rX $(CURDIR)/data $(CURDIR)/fixtures; \
	  echo "made data/ and fixtures/ readable by the OS user $(PGUSER), which runs the server"; }

db-reset:
	@$(PSQL) -d postgres -qc "DROP DATABASE IF EXISTS $(DB)" 2>/dev/null || true
	$(MAKE) db

db-stop:
	@$(RUNAS) $(PGBIN)/pg_ctl -D $(PGDATA) -m fast stop 2>/dev/null || true

psql:
	$(PSQL) -d $(DB)

# The demo's outputs go to $(DEMO_OUT) (ignored by git), written by psql on the client
# side, so they belong to whoever runs it. `make demo-publish` copies them to results/,
# the copies the README links, when a change deserves new published figures.
demo: db check-access
	mkdir -p $(DEMO_OUT)
	$(PSQL) -d $(DB) -v ON_ERROR_STOP=1 -v data=$(CURDIR)/data -v results=$(DEMO_OUT)/demo_results.txt -v png=$(DEMO_OUT)/pbmc3k_map.png -v png2=$(DEMO_OUT)/pbmc3k_transfer.png -f scripts/demo.sql

demo-publish:
	@test -s $(DEMO_OUT)/demo_results.txt -a -s $(DEMO_OUT)/pbmc3k_map.png || { echo "make demo-publish: run make demo first"; exit 1; }
	cp $(DEMO_OUT)/demo_results.txt $(DEMO_OUT)/pbmc3k_map.png $(DEMO_OUT)/pbmc3k_transfer.png results/

test-core:
	cargo test -p exceiver-core

test-pg: check-access
	mkdir -p $(TESTDATA) && chown $(PGUSER): $(TESTDATA)
	cargo pgrx test pg15 --runas $(PGUSER) --pgdata $(TESTDATA)/data

test-regress: db check-access
	mkdir -p /tmp/exceiver_regress_10x && chown $(PGUSER): /tmp/exceiver_regress_10x
	rm -f /tmp/exceiver_regress_bad.*
	EXCEIVER_DATA=$(CURDIR)/data EXCEIVER_ROOT=$(CURDIR) $(PGXS_DIR)/../test/regress/pg_regress --inputdir=tests/pg_regress --outputdir=tests/pg_regress \
	  --bindir=$(PGBIN) --host=$(PGHOST) --port=$(PGPORT) --user=$(PGUSER) \
	  --dbname=exceiver_regress --load-extension=vector --load-extension=exceiver $(REGRESS) || { \
	  head -c 20000 tests/pg_regress/regression.diffs; exit 1; }

test: setup
	$(MAKE) test-core
	$(MAKE) test-pg
	$(MAKE) test-regress
	$(MAKE) test-client
	$(MAKE) test-cluster
	@echo "make test: all layers passed"

# A real client: psycopg 3 + the pgvector package read embeddings into numpy and check
# them against exceiver.embed (tests/client/test_client.py), in a venv of its own.
CLIENT_VENV := .venv-client
test-client: db
	test -x $(CLIENT_VENV)/bin/python || python3 -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/pip install -q --disable-pip-version-check 'psycopg[binary]>=3.1,<3.4' 'pgvector>=0.3,<0.5' 'numpy>=1.24,<3'
	PGHOST=$(PGHOST) PGPORT=$(PGPORT) PGUSER=$(PGUSER) $(CLIENT_VENV)/bin/python tests/client/test_client.py

# A coordinator and two shard servers (ports CLUSTER_PORT, +1, +2; default 5491-5493) on
# this machine, PBMC 3k hash-partitioned over the shards (README, Scaling out).
CLUSTER_PORT ?= 5491
cluster: install check-access
	CLUSTER_PORT=$(CLUSTER_PORT) bash scripts/cluster.sh start

cluster-stop:
	CLUSTER_PORT=$(CLUSTER_PORT) bash scripts/cluster.sh stop

cluster-reset:
	CLUSTER_PORT=$(CLUSTER_PORT) bash scripts/cluster.sh reset

test-cluster: install check-access
	CLUSTER_PORT=$(CLUSTER_PORT) bash tests/cluster/test_cluster.sh

# Not part of `make test`: embedding and training throughput on one and two shards
# against one server; results in results/cluster_results.txt.
cluster-bench: install check-access
	CLUSTER_PORT=$(CLUSTER_PORT) bash scripts/cluster_bench.sh

bench: db check-access
	EXCEIVER_ROOT=$(CURDIR) $(PSQL) -d $(DB) -v ON_ERROR_STOP=1 -f scripts/bench_embed.sql

# Not part of `make test`: 16 sessions for 4 minutes (SOAK_CLIENTS, SOAK_SECONDS).
soak: db check-access
	PGPORT=$(PGPORT) PGHOST=$(PGHOST) bash scripts/soak.sh

# Not part of `make test`: SCALE_CELLS (1,000,000) cells generated from data/, loaded,
# embedded, indexed, searched, trained on; results in results/scale_results.txt.
SCALE_CELLS ?= 1000000
scale: db check-access
	SCALE_CELLS=$(SCALE_CELLS) PSQL="$(PSQL)" DB=$(DB) bash scripts/scale.sh

# The catalogue of every error the golden tests provoke, with SQLSTATEs (README, Errors).
errors: db check-access
	@start=$$(stat -c %s $(PGDATA)/server.log); $(MAKE) --no-print-directory test-regress >/dev/null && \
	  sleep 1 && python3 scripts/error_catalogue.py $(PGDATA)/server.log $$start tests/pg_regress/expected/*.out

# Not part of `make test`: each fuzz target for FUZZ_SECONDS (120); results in out/fuzz/.
fuzz: setup
	bash scripts/fuzz.sh

cuda:
	bash scripts/build_cuda.sh

pg-bundle: install
	bash scripts/pg_bundle.sh

pg-bundle-check: pg-bundle
	DEVICE=cpu CELLS=$${CELLS:-2000} bash scripts/gpu_pg.sh

fmt:
	cargo fmt --all
