"""Write a syntactically valid, random-but-structured run with ``engine.artifacts.write_run``.

For developing and testing the dashboard without the engine, and for the speed benchmark.
The data imitate the digits sample: pretraining examples of 10 classes (a few with flipped
labels, ``source == "flipped"``), finetuning on even / odd, 8x8 images (or short texts).  Scores
are low-rank products, so there are clear helpful and harmful examples: flipped examples are
harmful to the misclassified test points.  ``total = pretrained_term + finetuned_term`` exactly
(in float32).

    python benchmarks/make_synthetic_run.py --out runs/synthetic --n-pretrain 1100 --n-test 200
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.artifacts import write_run  # noqa: E402

WORDS = ("zero one two three four five six seven eight nine loop line curve stroke dot "
         "slant bold thin wide narrow top bottom left right").split()
DIGIT_WORDS = WORDS[:10]


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    """Ten smooth 8x8 patterns in 0..16, one per class."""
    yy, xx = np.mgrid[0:8, 0:8]
    protos = []
    for _ in range(10):
        img = np.zeros((8, 8))
        for _ in range(3):
            cy, cx = rng.uniform(1, 7, size=2)
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(1.5, 4))
        protos.append(16 * img / img.max())
    return np.stack(protos)


def _payload(rng: np.random.Generator, digits: np.ndarray, protos: np.ndarray,
             render: str) -> tuple[str, list]:
    if render == "image":
        noise = rng.normal(0, 2.0, size=(len(digits), 64))
        pix = np.clip(protos[digits].reshape(len(digits), 64) + noise, 0, 16).astype(np.float32)
        return "pixels", list(pix)
    words = rng.integers(0, len(WORDS), size=(len(digits), 5))
    return "text", [DIGIT_WORDS[d] + " " + " ".join(WORDS[w] for w in ws)
                    for d, ws in zip(digits, words, strict=True)]


def make_synthetic_run(out: str | Path, n_pretrain: int = 1100, n_test: int = 200,
                       seed: int = 0, render: str = "image", flip_rate: float = 0.08,
                       rank: int = 6, converged: bool = True, overwrite: bool = True,
                       approximation: str | None = None) -> Path:
    """Write the run and return its path (replacing an existing one when ``overwrite``)."""
    rng = np.random.default_rng(seed)
    protos = _prototypes(rng)

    # Pretraining examples: true digit, observed label (some flipped), payload, metadata.
    true_digit = rng.integers(0, 10, size=n_pretrain)
    flipped = rng.random(n_pretrain) < flip_rate
    label = np.where(flipped, (true_digit + rng.integers(1, 10, size=n_pretrain)) % 10,
                     true_digit)
    render_col, payload = _payload(rng, true_digit, protos, render)
    pretrain = pd.DataFrame({
        "example_id": [f"p{i:06d}" for i in range(n_pretrain)],
        "label": label.astype(np.int64),
        render_col: payload,
        "source": np.where(flipped, "flipped", "original"),
        "pretrain_loss": rng.gamma(2.0, 0.15, size=n_pretrain) + flipped * 2.0,
    })

    # Test points: even/odd task; ~10% misclassified.
    test_digit = rng.integers(0, 10, size=n_test)
    t_label = test_digit % 2
    wrong = rng.random(n_test) < 0.1
    pred = np.where(wrong, 1 - t_label, t_label)
    p_pred = rng.uniform(0.55, 0.99, size=n_test)
    prob = np.where(pred[:, None] == np.arange(2)[None, :], p_pred[:, None], 1 - p_pred[:, None])
    t_col, t_payload = _payload(rng, test_digit, protos, render)
    test_points = pd.DataFrame({
        "test_id": [f"t{i:05d}" for i in range(n_test)],
        "label": t_label.astype(np.int64),
        "pred": pred.astype(np.int64),
        "loss": -np.log(prob[np.arange(n_test), t_label]),
        "correct": ~wrong,
        "prob_0": prob[:, 0], "prob_1": prob[:, 1],
        "confidence": prob.max(axis=1),
        t_col: t_payload,
    })

    # Scores: low-rank products. Same-class examples help; flipped examples harm the
    # misclassified test points most.
    same_class = (test_digit[:, None] == np.arange(10)[None, :]).astype(np.float32)  # (T, 10)
    onehot = (true_digit[None, :] == np.arange(10)[:, None]).astype(np.float32)  # (10, M)
    t_fac = rng.normal(size=(n_test, rank)).astype(np.float32)
    t_fac[:, 0] = np.where(wrong, 3.0, 0.5)
    m_fac_pre = rng.normal(size=(rank, n_pretrain)).astype(np.float32) * 0.3
    m_fac_ft = rng.normal(size=(rank, n_pretrain)).astype(np.float32) * 0.2
    m_fac_pre[0] = -1.5 * flipped
    m_fac_ft[0] = -1.0 * flipped
    scale = np.float32(1.0 / n_pretrain)
    pretrained = (same_class @ onehot + t_fac @ m_fac_pre) * scale
    finetuned = (0.5 * same_class @ onehot + t_fac @ m_fac_ft) * scale
    pretrained = pretrained.astype(np.float32, copy=False)
    finetuned = finetuned.astype(np.float32, copy=False)
    total = pretrained + finetuned

    centers = np.stack([np.cos(np.arange(10) * 2 * np.pi / 10),
                        np.sin(np.arange(10) * 2 * np.pi / 10)], axis=1) * 5
    pretrain_xy = centers[true_digit] + rng.normal(0, 0.8, size=(n_pretrain, 2))
    pretrain_xy = pretrain_xy.astype(np.float32)
    test_xy = (centers[test_digit] + rng.normal(0, 0.8, size=(n_test, 2))).astype(np.float32)

    stage = {"damping": 0.001, "solver": "cg", "final_grad_norm": 1e-7, "converged": True,
             "tolerance": 1e-6, "iterations": 120, "weight_decay": 0.0005}
    manifest = {
        "config": {"data": {"name": "synthetic-digits", "n_pretrain": n_pretrain,
                            "n_test": n_test, "seed": seed},
                   "model": {"hidden": 32}, "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
                   "influence": {"solver": "cg", "damping": 0.001}, "map": {"method": "random"}},
        "scenario": "updated",
        "alpha": 1.0,
        "measurement": "loss",
        "stages": {"pretrain": dict(stage),
                   "finetune": dict(stage, converged=converged,
                                    final_grad_norm=1e-7 if converged else 3e-2)},
        "tracked_backbone": "all",
        "approximation": approximation,
        "metrics": {"test_accuracy": float((~wrong).mean()), "n_test": n_test,
                    "n_misclassified": int(wrong.sum()), "pretrain_train_accuracy": 0.97,
                    "finetune_train_accuracy": 0.95},
        "classes": {"pretrain": [str(i) for i in range(10)], "finetune": ["even", "odd"]},
        "render": ({"kind": "image", "column": "pixels", "shape": [8, 8]} if render == "image"
                   else {"kind": "text", "column": "text"}),
        "timings": {"synthetic": 0.0},
        "versions": {"generator": "benchmarks/make_synthetic_run.py"},
        "input_hashes": {},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "excluded_ids": [],
    }
    return write_run(out, manifest, test_points, pretrain,
                     {"total": total, "pretrained_term": pretrained, "finetuned_term": finetuned},
                     pretrain_xy, test_xy, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-pretrain", type=int, default=1100)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", choices=("image", "text"), default="image")
    p.add_argument("--unconverged", action="store_true",
                   help="mark the finetuning solver as not converged (to see the warning)")
    args = p.parse_args(argv)
    path = make_synthetic_run(args.out, args.n_pretrain, args.n_test, args.seed, args.render,
                              converged=not args.unconverged)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
