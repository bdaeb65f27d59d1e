#!/usr/bin/env python3
"""Reference fits of the linear probe, by scikit-learn, for
`crates/exceiver-core/tests/probe_sklearn.rs`.

Writes fixtures/metrics/probe_reference.json: seeded training and test embeddings
(3 overlapping classes in 6 dimensions, features of different scales) and, for a
3-class and a 2-class problem, StandardScaler + LogisticRegression(C=0.5, tol=1e-10,
max_iter=10000) probabilities on the test cells, with log_loss and accuracy.

Run: python3 -m venv /tmp/skl && /tmp/skl/bin/pip install scikit-learn numpy &&
/tmp/skl/bin/python scripts/probe_reference.py
"""
import json
import os

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.preprocessing import StandardScaler

rng = np.random.default_rng(20261205)


def make(n):
    y = rng.integers(0, 3, n)
    centres = np.array([[1, 0, 0, 0.5, 0, 0], [0, 1, 0, 0, 0.5, 0], [0, 0, 1, 0, 0, 0.5]]) * 1.5
    x = centres[y] + rng.normal(0, 1, (n, 6))
    x *= np.array([1, 10, 0.1, 3, 1, 100])  # scales that standardisation undoes
    return np.round(x, 4).astype(np.float32), y


xtr, ytr = make(400)
xte, yte = make(200)
out = {
    "generator": "scripts/probe_reference.py",
    "versions": {"numpy": np.__version__, "scikit-learn": sklearn.__version__},
    "dim": 6, "c": 0.5,
    "train_x": [float(str(v)) for v in xtr.ravel()], "train_y": ytr.tolist(),
    "test_x": [float(str(v)) for v in xte.ravel()], "test_y": yte.tolist(),
}
for name, tr, te in [("three", ytr, yte), ("two", (ytr == 2).astype(int), (yte == 2).astype(int))]:
    scaler = StandardScaler().fit(xtr.astype(np.float64))
    clf = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(scaler.transform(xtr.astype(np.float64)), tr)
    p = clf.predict_proba(scaler.transform(xte.astype(np.float64)))
    out[name] = {"proba": p.ravel().tolist(), "log_loss": log_loss(te, p),
                 "accuracy": accuracy_score(te, p.argmax(1))}
path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "metrics", "probe_reference.json")
with open(path, "w") as f:
    json.dump(out, f)
print({k: out[k]["log_loss"] for k in ("three", "two")}, {k: out[k]["accuracy"] for k in ("three", "two")})
