"""Loading a user's tabular data (Parquet or CSV) into validated arrays.

Every problem is reported as a :class:`DataError` whose message names the file and, where it
applies, the column and the row (0-based data row index, header not counted, plus the id value),
and says what to do about it.  Validation happens here, once, so the engine can assume clean
float64 features, unique string ids and integer class indices.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas._libs.parsers import STR_NA_VALUES

from engine.ids_file import id_problem

if TYPE_CHECKING:  # config.py imports this module; import it only for type checkers.
    from engine.config import RunConfig

SUFFIXES = (".parquet", ".csv")

# Label value meaning "no label" when a table is loaded with require_labels=False.
NO_LABEL = -1


class DataError(ValueError):
    """A data file is missing, unreadable or does not match the configured columns."""


@dataclass
class Table:
    """One validated data table.

    ``frame`` keeps the non-feature columns a run needs to carry along (id, label, metadata and
    text columns) in the original row order; ``X``/``y`` are what the models train on.
    """

    path: Path
    ids: np.ndarray  # str ids, unique
    X: np.ndarray  # float64 (n, d)
    y: np.ndarray  # int64 index into `classes`; NO_LABEL where a label is absent (optional only)
    classes: list
    feature_columns: list[str]
    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.ids)


def label_key(value: Any) -> str | None:
    """Canonical comparison key of a class label, or None for a missing value.

    Why: a CSV integer label ``3`` (or ``3.0`` after pandas up-casts a column with gaps, or the
    string ``"3"`` in a mixed column) must match a declared class ``3``, while string labels must
    match string classes exactly (apart from surrounding whitespace).
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        f = float(value)
        if math.isnan(f):
            return None
        return str(int(f)) if f.is_integer() else repr(f)
    text = str(value).strip()
    try:  # numeric-looking strings compare as numbers, so "3" == 3 == 3.0
        f = float(text)
    except ValueError:
        return text
    if math.isfinite(f) and f.is_integer() and text.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(f))
    return text


def load_table(
    path: str | Path,
    *,
    id_column: str,
    label_column: str,
    classes: Sequence[Any],
    feature_columns: Sequence[str] | None = None,
    feature_prefix: str | None = None,
    metadata_columns: Sequence[str] = (),
    text_column: str | None = None,
    require_labels: bool = True,
) -> Table:
    """Read and validate a ``.parquet`` or ``.csv`` table.

    Exactly one of ``feature_columns`` (explicit list) and ``feature_prefix`` (every column whose
    name starts with it, in file order) selects the features.  Labels are mapped to indices into
    ``classes``.  With ``require_labels=False`` the label column may be absent or have empty
    cells, which become ``NO_LABEL`` (-1); labels that are present must still be declared.

    Raises:
        DataError: naming the file, and the column and row where relevant.
    """
    path = Path(path)
    name = str(path)
    if (feature_columns is None) == (feature_prefix is None):
        raise DataError(
            f"{name}: give exactly one of feature_columns or feature_prefix to select the "
            "feature columns"
        )
    classes = list(classes)
    class_index = _class_index(name, classes)

    df = _read(path, id_column)
    if len(df.columns) == 0 or len(df) == 0:
        raise DataError(f"{name}: the table is empty (no data rows); it needs at least one row")
    df = df.reset_index(drop=True)
    columns = [str(c) for c in df.columns]
    df.columns = columns

    if feature_prefix is not None:
        features = [c for c in columns if c.startswith(feature_prefix)]
        if not features:
            raise DataError(
                f"{name}: no column starts with feature_prefix {feature_prefix!r}; columns are "
                f"{_preview(columns)}. Fix feature_prefix or list feature_columns explicitly"
            )
    else:
        features = [str(c) for c in feature_columns]  # type: ignore[union-attr]
        if not features:
            raise DataError(f"{name}: feature_columns is empty; list at least one column")
        _check_unique(name, "feature_columns", features)

    metadata = [str(c) for c in metadata_columns]
    _check_unique(name, "metadata_columns", metadata)
    roles = {id_column: "id column", label_column: "label column"}
    if text_column:
        roles.setdefault(text_column, "text column")
    for col in features + metadata:
        if col in roles:
            kind = "feature" if col in features else "metadata"
            raise DataError(
                f"{name}: column {col!r} is both the {roles[col]} and a {kind} column; "
                "each column can have one role only"
            )

    required = [id_column, *features, *metadata]
    if require_labels:
        required.append(label_column)
    if text_column:
        required.append(text_column)
    missing = [c for c in dict.fromkeys(required) if c not in df.columns]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(repr(c) for c in missing)}; the file has "
            f"{_preview(columns)}. Rename the columns in the file or fix the config"
        )

    ids = _ids(name, df[id_column])
    X = _features(name, df, features, ids)
    if label_column in df.columns:
        y = _labels(name, df[label_column], classes, class_index, ids, require_labels)
    else:
        y = np.full(len(df), NO_LABEL, dtype=np.int64)

    keep = [c for c in dict.fromkeys([id_column, label_column, *metadata, text_column or ""])
            if c and c in df.columns]
    frame = df[keep].copy()
    frame[id_column] = ids
    return Table(
        path=path, ids=ids, X=X, y=y, classes=classes, feature_columns=features, frame=frame
    )


def check_same_features(a: Table, b: Table) -> None:
    """Raise DataError unless both tables have the same feature columns in the same order.

    Why: the finetuned model consumes the backbone trained on the pretraining features, so a
    column missing, extra or reordered in one file would silently feed it the wrong inputs.
    """
    if a.feature_columns == b.feature_columns:
        return
    only_a = [c for c in a.feature_columns if c not in set(b.feature_columns)]
    only_b = [c for c in b.feature_columns if c not in set(a.feature_columns)]
    if only_a or only_b:
        detail = []
        if only_a:
            detail.append(f"only in {a.path}: {_preview(only_a)}")
        if only_b:
            detail.append(f"only in {b.path}: {_preview(only_b)}")
        what = "; ".join(detail)
    else:
        pos = next(i for i, (ca, cb) in enumerate(zip(a.feature_columns, b.feature_columns,
                                                      strict=True)) if ca != cb)
        what = (f"same columns in a different order: position {pos} is "
                f"{a.feature_columns[pos]!r} in {a.path} but {b.feature_columns[pos]!r} "
                f"in {b.path}")
    raise DataError(
        f"{a.path} and {b.path} have different feature columns ({what}). All data files must "
        "share the same feature columns in the same order"
    )


def load_run_data(cfg: RunConfig) -> tuple[Table, Table, Table]:
    """Load the (pretrain, finetune_train, finetune_test) tables named by a run config.

    The finetuning tables use ``finetune_classes`` and carry no metadata columns; all three must
    share their feature columns, and with ``render = "image"`` the number of features must match
    ``image_shape``.
    """
    d = cfg.data
    common: dict[str, Any] = dict(
        id_column=d.id_column,
        label_column=d.label_column,
        feature_columns=list(d.feature_columns) if d.feature_columns is not None else None,
        feature_prefix=d.feature_prefix,
        text_column=d.text_column or None,
    )
    pretrain = load_table(
        d.pretrain, classes=list(d.pretrain_classes),
        metadata_columns=list(d.metadata_columns), **common,
    )
    train = load_table(d.finetune_train, classes=list(d.finetune_classes), **common)
    test = load_table(d.finetune_test, classes=list(d.finetune_classes), **common)
    check_same_features(pretrain, train)
    check_same_features(pretrain, test)
    if d.render == "image":
        size = math.prod(d.image_shape)
        if size != len(pretrain.feature_columns):
            raise DataError(
                f"{pretrain.path}: [data] render = 'image' with image_shape = "
                f"{list(d.image_shape)} needs {size} feature columns, but the files have "
                f"{len(pretrain.feature_columns)}. Fix image_shape, or set render = 'none'"
            )
    return pretrain, train, test


# --- internals -------------------------------------------------------------------------------


def _read(path: Path, id_column: str) -> pd.DataFrame:
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{name}: unsupported file type {path.suffix or '(no suffix)'!r}; save the table as "
            ".parquet or .csv"
        )
    if not path.exists():
        raise DataError(f"{name}: file not found; check the path (config paths are relative to "
                        "the config file's directory)")
    if not path.is_file():
        raise DataError(f"{name}: is not a file")
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        # Ids are read as text so "007" stays "007"; low_memory=False types each column from all
        # rows rather than per chunk, so a column never comes back half numbers, half strings.
        # index_col=False + the warning as an error: otherwise a first data row with extra
        # fields silently turns the leading columns into the index and shifts every column.
        # Ids are strings: pandas' NA spellings ("NA", "null", "N/A", ...) stay ids there, and
        # keep meaning missing in every other column.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            header = pd.read_csv(path, nrows=0, index_col=False).columns
            na = {c: sorted(STR_NA_VALUES) for c in header if c != id_column}
            return pd.read_csv(
                path, dtype={id_column: str}, index_col=False, low_memory=False,
                keep_default_na=False, na_values=na,
            )
    except pd.errors.ParserWarning:
        raise DataError(
            f"{name}: a data row has more fields than the header; check the delimiters and "
            "quoting (every row needs exactly one value per header column)"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{name}: the file is empty; it needs a header and data rows") from None
    except Exception as exc:  # pyarrow, parser and decoding errors all mean "malformed file"
        kind = "Parquet" if suffix == ".parquet" else "CSV"
        raise DataError(
            f"{name}: could not read the file as {kind} ({type(exc).__name__}: {exc}). "
            f"Check that it is a valid {kind} file"
        ) from exc


def _class_index(name: str, classes: list) -> dict[str, int]:
    if not classes:
        raise DataError(f"{name}: no classes declared; declare the class values in the config")
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        key = label_key(c)
        if key is None:
            raise DataError(f"{name}: declared class #{i} is empty; declare concrete values")
        if key in index:
            raise DataError(
                f"{name}: declared classes {classes!r} contain {classes[index[key]]!r} and {c!r}, "
                "which compare equal; declare each class once"
            )
        index[key] = i
    return index


def _row(i: int, ids: np.ndarray) -> str:
    return f"row {i} (id {str(ids[i])!r})"


def _ids(name: str, col: pd.Series) -> np.ndarray:
    col_name = col.name
    out: list[str] = []
    for i, v in enumerate(col.tolist()):
        key = label_key(v)  # integral floats (ids up-cast by pandas) become "12", not "12.0"
        if key is None or key == "":
            raise DataError(
                f"{name}: column {col_name!r}, row {i}: the id is missing; every row needs an id"
            )
        text = str(v).strip() if isinstance(v, str) else key
        problem = id_problem(text)
        if problem is not None:
            raise DataError(f"{name}: column {col_name!r}, row {i}: {problem}; ids must be one "
                            "line of text (ids files hold one id per line)")
        out.append(text)
    ids = np.array(out, dtype=str)
    seen: dict[str, int] = {}
    for i, v in enumerate(out):
        if v in seen:
            raise DataError(
                f"{name}: column {col_name!r}: duplicate id {v!r} in row {seen[v]} and row {i}; "
                "ids must be unique"
            )
        seen[v] = i
    return ids


def _features(
    name: str, df: pd.DataFrame, features: list[str], ids: np.ndarray
) -> np.ndarray:
    if all(pd.api.types.is_numeric_dtype(df[c].dtype) for c in features):
        # Fast path (e.g. 784 pixel columns x 60,000 rows): one conversion and one finiteness
        # check for the whole block; a bad value is then reported by the column loop below,
        # which finds the same first column and row.
        # np.require: a C-ordered, writable array of its own, exactly as the loop below makes
        # (pandas may hand back a read-only or column-major view of its blocks).
        X = np.require(df[features].to_numpy(dtype=np.float64, na_value=np.nan),
                       requirements=["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])
        if np.isfinite(X).all():
            return X
    X = np.empty((len(df), len(features)), dtype=np.float64)
    for j, col in enumerate(features):
        s = df[col]
        if not pd.api.types.is_numeric_dtype(s.dtype):  # bool counts as numeric (0/1)
            # Report the first cell that is not a number (text columns, stray strings in a CSV).
            num = pd.to_numeric(s, errors="coerce")
            bad = num.isna() & s.notna()
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise DataError(
                    f"{name}: column {col!r}, {_row(i, ids)}: value {s.iloc[i]!r} is not a "
                    "number; feature columns must be numeric (fix the value, or drop the column "
                    "from the features)"
                )
            s = num
        X[:, j] = s.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(X[:, j])
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            what = "is missing (empty or NaN)" if np.isnan(X[i, j]) else f"is {float(X[i, j])}"
            raise DataError(
                f"{name}: column {col!r}, {_row(i, ids)}: the value {what}; features must be "
                "finite numbers, so fill in or drop rows with missing/NaN/inf features"
            )
    return X


def _labels(
    name: str,
    col: pd.Series,
    classes: list,
    class_index: dict[str, int],
    ids: np.ndarray,
    require_labels: bool,
) -> np.ndarray:
    y = np.empty(len(col), dtype=np.int64)
    for i, v in enumerate(col.tolist()):
        key = label_key(v)
        if key is None:
            if require_labels:
                raise DataError(
                    f"{name}: column {col.name!r}, {_row(i, ids)}: the label is missing; every "
                    f"row needs one of the declared classes {classes!r}"
                )
            y[i] = NO_LABEL
            continue
        k = class_index.get(key)
        if k is None:
            raise DataError(
                f"{name}: column {col.name!r}, {_row(i, ids)}: label {v!r} is not one of the "
                f"declared classes {classes!r}; fix the label or add it to the classes in the "
                "config"
            )
        y[i] = k
    return y


def _check_unique(name: str, what: str, cols: list[str]) -> None:
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
        raise DataError(f"{name}: {what} lists {_preview(dup)} more than once; list each once")


def _preview(cols: Sequence[str], limit: int = 12) -> str:
    """Column list for messages, shortened so a 784-pixel table does not flood the terminal."""
    shown = ", ".join(repr(c) for c in cols[:limit])
    if len(cols) > limit:
        return f"[{shown}, ...] ({len(cols)} columns)"
    return f"[{shown}]"
