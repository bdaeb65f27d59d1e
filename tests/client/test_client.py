"""Data out to Python: a real driver (psycopg 3 with the pgvector package) reads a cell
table's embeddings and labels into numpy arrays, and they equal what exceiver.embed gives
for the same cells. Run by `make test-client` (part of `make test`) against `make db`.

Self-contained: it creates the database `exceiver_client`, loads PBMC 3k from data/,
trains a tiny model and embeds the table into a `vector` and a `halfvec` column.
"""
import os
import sys

import numpy as np
import psycopg
from pgvector.psycopg import register_vector, HalfVector

HOST = os.environ.get("PGHOST", "/tmp")
PORT = int(os.environ.get("PGPORT", "5488"))
USER = os.environ.get("PGUSER", "postgres")
DB = "exceiver_client"
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "data")


def connect(dbname):
    return psycopg.connect(host=HOST, port=PORT, user=USER, dbname=dbname, autocommit=True)


def setup():
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    with connect(DB) as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE EXTENSION exceiver")
        c.execute("SELECT * FROM exceiver.load_10x(%s, 'pbmc3k')", (os.path.join(DATA, "pbmc3k"),))
        c.execute(
            """SELECT model FROM exceiver.train('client_tiny', 'pbmc3k', '{"preset": "small", "seq_dim": 8,
               "query_len": 8, "num_layers": 1, "dim_feedforward": 16, "epochs": 1, "batch_size": 64,
               "min_cells": 10, "n_top_genes": 2000, "seed": 1}')"""
        )
        c.execute("SELECT cells FROM exceiver.embed_table('client_tiny', 'pbmc3k', 'embedding')")
        dim = c.execute("SELECT embedding_dim FROM exceiver.models WHERE name = 'client_tiny'").fetchone()[0]
        c.execute(f"ALTER TABLE pbmc3k ADD COLUMN embedding_half halfvec({dim})")
        c.execute("UPDATE pbmc3k SET embedding_half = embedding::halfvec")
    return dim


def main():
    dim = setup()
    with connect(DB) as conn:
        register_vector(conn)
        # What an analyst writes: embeddings and labels into arrays, in one query.
        rows = conn.execute(
            "SELECT cell_id, seurat_annotations, embedding, embedding_half FROM pbmc3k ORDER BY cell_id"
        ).fetchall()
        cell_ids = [r[0] for r in rows]
        labels = np.array([r[1] if r[1] is not None else "" for r in rows])
        X = np.stack([r[2] for r in rows])
        H = np.stack([r[3].to_numpy() for r in rows])
        assert X.shape == (2700, dim), X.shape
        assert X.dtype == np.float32, X.dtype
        assert isinstance(rows[0][3], HalfVector)
        assert H.shape == X.shape
        assert np.isfinite(X).all()
        assert len(set(cell_ids)) == 2700
        assert (labels != "").sum() == 2638, (labels != "").sum()
        # halfvec is the same embedding rounded to half precision
        rel = np.abs(H.astype(np.float32) - X).max() / np.abs(X).max()
        assert rel < 1e-3, rel

        # The same cells embedded by exceiver.embed, one call per cell, as vector and real[].
        check = conn.execute(
            """SELECT cell_id, exceiver.embed('client_tiny', genes, counts),
                      exceiver.embed_array('client_tiny', genes, counts)
               FROM pbmc3k WHERE cell_id = ANY(%s) ORDER BY cell_id""",
            (cell_ids[::97],),
        ).fetchall()
        assert len(check) == len(cell_ids[::97])
        index = {c: i for i, c in enumerate(cell_ids)}
        for cell_id, v, arr in check:
            row = X[index[cell_id]]
            assert np.array_equal(v, row), cell_id
            assert np.array_equal(np.asarray(arr, dtype=np.float32), row), cell_id

        # A query embedding as a parameter: the nearest cells by cosine distance, and the
        # same ranking computed in numpy from the arrays read above.
        q = X[0]
        near = conn.execute(
            "SELECT cell_id FROM pbmc3k ORDER BY embedding <=> %s LIMIT 10", (q,)
        ).fetchall()
        cos = (X @ q) / (np.linalg.norm(X, axis=1) * np.linalg.norm(q))
        top = [cell_ids[i] for i in np.argsort(-cos, kind="stable")[:10]]
        assert [r[0] for r in near][:5] == top[:5], (near, top)
    print(f"client test passed: {X.shape[0]} cells x {dim} dimensions read as numpy "
          f"(vector and halfvec), {len(check)} cells equal to exceiver.embed, nearest-neighbour order agrees")
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE {DB}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
