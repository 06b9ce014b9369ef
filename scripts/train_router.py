#!/usr/bin/env python3
"""Trains the router's learned head (scripts/train-router runs this; see it for usage).

Input: JSONL features from `duet classify --dump-features` (the static all-minilm
embeddings of each prompt's instruction and its first clause, and the request signals, computed by duet itself, so training
and serving read the same numbers), plus optionally duet decision logs, whose lines with
a `label` (a client's X-Duet-Tier) are used as extra examples.

Model: multinomial logistic regression (scikit-learn, lbfgs: deterministic), the signals
standardised, the embeddings scaled by a factor (their weight against the signals under
the one regularisation, folded into the weights on export); C and that factor chosen by
repeated stratified 5-fold cross-validation. Output: the head JSON that duet loads.
"""
import argparse
import json
import sys

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_predict, StratifiedKFold

CLASSES = ["SIMPLE", "MODERATE", "COMPLEX"]
SIGNALS = ["code_lines", "has_code", "inline_code", "instruction_words", "turns", "system_prompt", "num_predict_set", "num_predict"]


def load_features(path):
    X, y = [], []
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            X.append(r["embedding"] + r["signals"])
            y.append(CLASSES.index(r["tier"]) if r.get("tier") else -1)
    return np.array(X, dtype=np.float64), np.array(y)


def load_log(path):
    """Labelled lines of a duet routing log (X-Duet-Tier corrections)."""
    X, y = [], []
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        f, label = r.get("features"), r.get("label")
        if f and label in CLASSES:
            X.append(f["embedding"] + f["signals"])
            y.append(CLASSES.index(label))
    width = len(X[0]) if X else 0
    return np.array(X, dtype=np.float64).reshape(-1, width), np.array(y, dtype=int)


def standardise(X, dims, mean, scale, es):
    """The embeddings scaled by `es` (their weight against the signals under the one
    regularisation), the signals standardised."""
    Z = X.copy()
    Z[:, :dims] *= es
    Z[:, dims:] = np.clip((Z[:, dims:] - mean) / scale, -3.0, 3.0)  # as duet clips them
    return Z


def matrix_text(m):
    corner = "expected \\ predicted"
    rows = [f"{corner:<20} {'SIMPLE':>8} {'MODERATE':>8} {'COMPLEX':>8}"]
    for c, row in zip(CLASSES, m):
        rows.append(f"{c:<20} {row[0]:>8} {row[1]:>8} {row[2]:>8}")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True, help="features of the training corpus")
    ap.add_argument("--corpus", required=True, help="the corpus file, for the record")
    ap.add_argument("--log", action="append", default=[], help="duet routing log(s) with labels")
    ap.add_argument("--eval", action="append", default=[], help="NAME=FEATURES.jsonl to score the head on")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    X, y = load_features(args.train)
    if (y < 0).any():
        sys.exit(f"{args.train}: every line needs a tier")
    n_corpus = len(y)
    n_log = 0
    for p in args.log:
        Xl, yl = load_log(p)
        n_log += len(yl)
        if len(yl):
            if Xl.shape[1] != X.shape[1]:
                sys.exit(f"{p}: features of another head layout ({Xl.shape[1]} numbers, not {X.shape[1]})")
            X, y = np.vstack([X, Xl]), np.concatenate([y, yl])
    dims = X.shape[1] - len(SIGNALS)
    mean = X[:, dims:].mean(axis=0)
    scale = X[:, dims:].std(axis=0)
    scale[scale < 1e-6] = 1.0

    def model(C):
        return LogisticRegression(C=C, max_iter=5000, class_weight="balanced")

    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=0)
    grid = [(C, es) for C in (0.3, 1.0, 3.0) for es in (1.0, 3.0)]
    scores = {}
    for C, es in grid:
        Z = standardise(X, dims, mean, scale, es)
        accs = []
        for tr, te in cv.split(Z, y):
            m = model(C).fit(Z[tr], y[tr])
            accs.append((m.predict(Z[te]) == y[te]).mean())
        scores[(C, es)] = (float(np.mean(accs)), float(np.std(accs)))
        print(f"C={C:<5} embedding scale {es:<4} cross-validated accuracy {scores[(C, es)][0]:.3f} ± {scores[(C, es)][1]:.3f}", flush=True)
    best = max(grid, key=lambda g: (round(scores[g][0], 4), -g[0], -g[1]))
    C, es = best
    Z = standardise(X, dims, mean, scale, es)
    pred = cross_val_predict(model(C), Z, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    cm = confusion_matrix(y, pred, labels=[0, 1, 2])
    print(f"\nchosen C={C}, embedding scale {es}: 5-fold cross-validated accuracy {(pred == y).mean():.3f} "
          f"({(pred == y).sum()}/{len(y)}); confusion matrix:\n{matrix_text(cm)}")

    final = model(C).fit(Z, y)
    results = {}
    for spec in args.eval:
        name, path = spec.split("=", 1)
        Xe, ye = load_features(path)
        pe = final.predict(standardise(Xe, dims, mean, scale, es))
        acc = float((pe == ye).mean())
        results[name] = {"accuracy": acc, "correct": int((pe == ye).sum()), "total": int(len(ye)),
                         "confusion": confusion_matrix(ye, pe, labels=[0, 1, 2]).tolist()}
        print(f"\n{name}: {acc:.3f} ({(pe == ye).sum()}/{len(ye)})\n{matrix_text(results[name]['confusion'])}")

    head = {
        "version": 2,  # static (input) embeddings: duet refuses other versions
        "embedding_model": "sentence-transformers/all-MiniLM-L6-v2",
        "embedding_dims": int(dims),
        "max_tokens": args.max_tokens,
        "classes": CLASSES,
        "signals": SIGNALS,
        "signal_mean": [round(float(v), 6) for v in mean],
        "signal_scale": [round(float(v), 6) for v in scale],
        # The embedding scale folded into its weights: duet feeds the embeddings as they are.
        "weights": [[round(float(v) * (es if j < dims else 1.0), 6) for j, v in enumerate(row)] for row in final.coef_],
        "bias": [round(float(v), 6) for v in final.intercept_],
        "training": {
            "script": "scripts/train-router",
            "corpus": args.corpus,
            "examples": int(len(y)),
            "corpus_examples": n_corpus,
            "log_examples": n_log,
            "model": f"multinomial logistic regression, class_weight balanced, C={C}, embedding scale {es} (scikit-learn {sklearn.__version__})",
            "cv_accuracy": round(scores[best][0], 4),
            "cv": "repeated stratified 5-fold, 2 repeats",
            "eval": {k: round(v["accuracy"], 4) for k, v in results.items()},
        },
    }
    with open(args.out, "w") as f:
        json.dump(head, f, separators=(",", ":"))
        f.write("\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
