#!/usr/bin/env python3
"""Reference values of the embedding metrics, computed by scikit-learn and scipy, for
`crates/exceiver-core/tests/metrics_sklearn.rs`.

Writes fixtures/metrics/sklearn_reference.json: seeded synthetic embeddings (overlapping
Gaussian cell types, batch shifts, one cell type in a single batch), their labels and
batches, a perturbed "clustering", and what scikit-learn says of them:

- nmi, ari: normalized_mutual_info_score / adjusted_rand_score(labels, clustering)
- asw: (silhouette_score(X, labels, metric="euclidean") + 1) / 2 (scIB's scaling)
- batch_asw: scIB's silhouette_batch (per label with 2+ batches, 1 - |silhouette_samples
  by batch| averaged, then averaged over labels)
- graph_connectivity: scIB's graph_connectivity on the symmetrised 15-neighbour graph
  (the cell and its 14 nearest, Euclidean)
- louvain_best_nmi: the best NMI over resolutions 0.1..2.0 of networkx's Louvain on the
  same (unweighted) graph, seed 0: not the same algorithm run (our graph has UMAP's
  fuzzy weights, and Louvain's result depends on its node order), so compared loosely
- knn_accuracy, knn_macro_f1: leave-one-out KNeighborsClassifier(k=15, cosine, uniform
  weights) and f1_score(average="macro")

Run: python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn scipy numpy networkx &&
/tmp/skl/bin/python scripts/metrics_reference.py
"""
import json
import os

import networkx as nx
import numpy as np
import scipy
import sklearn
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import (adjusted_rand_score, f1_score, normalized_mutual_info_score,
                             silhouette_samples, silhouette_score)
from sklearn.neighbors import NearestNeighbors

rng = np.random.default_rng(20261205)
n, dim, n_labels, n_batches = 600, 16, 5, 3
labels = rng.integers(0, n_labels, n)
batches = rng.integers(0, n_batches, n)
batches[labels == 4] = 1  # one cell type seen in one batch only: no batch ASW for it
centres = rng.normal(0, 0.7, (n_labels, dim))
shift = rng.normal(0, 0.8, (n_batches, dim))
x = centres[labels] + shift[batches] + rng.normal(0, 1.5, (n, dim))
x = np.round(x, 4).astype(np.float32)
clustering = labels.copy()
flip = rng.random(n) < 0.2
clustering[flip] = rng.integers(0, n_labels + 2, flip.sum())

xd = x.astype(np.float64)
asw = (silhouette_score(xd, labels, metric="euclidean") + 1) / 2
per_label = []
for l in range(n_labels):
    m = labels == l
    nb = len(np.unique(batches[m]))
    if nb == 1 or nb == m.sum():
        continue
    s = silhouette_samples(xd[m], batches[m], metric="euclidean")
    per_label.append(np.mean(1 - np.abs(s)))
batch_asw = float(np.mean(per_label))

nn = NearestNeighbors(n_neighbors=15).fit(xd)
graph = nn.kneighbors_graph(xd, mode="connectivity")
graph = ((graph + graph.T) > 0).astype(np.float64)
conn = []
for l in range(n_labels):
    m = np.flatnonzero(labels == l)
    _, comp = connected_components(graph[m][:, m], connection="strong")
    conn.append(np.bincount(comp).max() / len(m))
graph_connectivity = float(np.mean(conn))

best_nmi = 0.0
for r in np.arange(1, 21) / 10:
    communities = nx.community.louvain_communities(nx.from_scipy_sparse_array(graph), resolution=r, seed=0)
    part = np.zeros(n, int)
    for c, members in enumerate(communities):
        part[list(members)] = c
    best_nmi = max(best_nmi, normalized_mutual_info_score(labels, part))

# leave-one-out kNN vote by cosine distance: the 16 nearest include the cell itself
unit = xd / np.linalg.norm(xd, axis=1, keepdims=True)
cos = NearestNeighbors(n_neighbors=16, metric="cosine").fit(unit)
_, idx = cos.kneighbors(unit)
pred = []
for i in range(n):
    nbrs = [j for j in idx[i] if j != i][:15]
    counts = np.bincount(labels[nbrs], minlength=n_labels)
    pred.append(int(np.argmax(counts)))  # ties to the lower label
pred = np.array(pred)

out = {
    "generator": "scripts/metrics_reference.py",
    "versions": {"numpy": np.__version__, "scipy": scipy.__version__,
                 "scikit-learn": sklearn.__version__, "networkx": nx.__version__},
    "n": n, "dim": dim,
    # shortest text of each float32, which reads back as the same float32
    "data": [float(str(v)) for v in x.ravel()],
    "labels": labels.tolist(), "batches": batches.tolist(), "clustering": clustering.tolist(),
    "nmi": normalized_mutual_info_score(labels, clustering),
    "ari": adjusted_rand_score(labels, clustering),
    "asw": asw, "batch_asw": batch_asw, "graph_connectivity": graph_connectivity,
    "louvain_best_nmi": best_nmi,
    "knn_accuracy": float(np.mean(pred == labels)),
    "knn_macro_f1": f1_score(labels, pred, average="macro"),
}
path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "metrics", "sklearn_reference.json")
os.makedirs(os.path.dirname(path), exist_ok=True)
with open(path, "w") as f:
    json.dump(out, f)
print({k: v for k, v in out.items() if k not in ("data", "labels", "batches", "clustering")})
