"""Generate the bring-your-own-data example: three 2-D gaussian blobs, stored as CSV.

Run ``python sample_data/byod_example/generate.py``; it is deterministic (seed 0) and writes
``pretrain.csv`` (210 rows, ids ``pa-*``/``pb-*`` by collection site), ``finetune_train.csv``
(60) and ``finetune_test.csv`` (60) next to this script, plus ``config.toml``.
Copy the folder and replace the CSVs with your own data: one row per example, a unique id
column, a label column and numeric feature columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

SEED = 0
OUT = Path(__file__).resolve().parent
CLASSES = ["red", "green", "blue"]
CENTERS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
# Pretraining data comes from two collection sites; site "b" is slightly shifted, which the
# `group` metadata column records so the dashboard can colour or filter by it.
SITE_SHIFT = {"a": np.array([0.0, 0.0]), "b": np.array([0.4, -0.3])}

CONFIG = """\
# Bring-your-own-data example: copy this folder, replace the CSVs, then edit the column names
# and classes below. Paths are relative to this file.
seed = 0

[data]
pretrain = "pretrain.csv"
finetune_train = "finetune_train.csv"
finetune_test = "finetune_test.csv"
id_column = "row_id"
label_column = "color"
feature_columns = ["x1", "x2"]
metadata_columns = ["group"]
pretrain_classes = ["red", "green", "blue"]
finetune_classes = ["red", "green", "blue"]
render = "none"

[model]
hidden = [16]
activation = "tanh"

[finetune]
scenario = "fixed"

[map]
method = "pca"
"""


def _blobs(rng: np.random.Generator, per_class: int, prefix: str, site: str | None = None,
           ) -> pd.DataFrame:
    """`per_class` points per colour, shuffled, with ids `<prefix>-000`, `<prefix>-001`, ..."""
    rows = []
    for k, name in enumerate(CLASSES):
        shift = SITE_SHIFT[site] if site else 0.0
        xy = CENTERS[k] + shift + rng.normal(scale=0.9, size=(per_class, 2))
        rows += [(name, x1, x2) for x1, x2 in xy]
    order = rng.permutation(len(rows))  # interleave the classes
    frame = pd.DataFrame([rows[i] for i in order], columns=["color", "x1", "x2"])
    frame[["x1", "x2"]] = frame[["x1", "x2"]].round(4)
    frame.insert(0, "row_id", [f"{prefix}-{i:03d}" for i in range(len(frame))])
    return frame


def main() -> None:
    """Write the example files next to this script."""
    rng = np.random.default_rng(SEED)
    pretrain = pd.concat(
        [_blobs(rng, 35, f"p{site}", site).assign(group=f"site-{site}") for site in ("a", "b")],
        ignore_index=True,
    )
    _blobs(rng, 20, "f").to_csv(OUT / "finetune_train.csv", index=False)
    _blobs(rng, 20, "t").to_csv(OUT / "finetune_test.csv", index=False)
    pretrain.to_csv(OUT / "pretrain.csv", index=False)
    (OUT / "config.toml").write_text(CONFIG)
    print(f"wrote {OUT}: pretrain {len(pretrain)}, finetune_train 60, finetune_test 60")


if __name__ == "__main__":
    main()
