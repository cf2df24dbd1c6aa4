"""TOML run configuration, parsed with stdlib ``tomllib`` into frozen dataclasses.

Every key except the three ``[data]`` file paths has a default.  Unknown keys and sections,
wrong types and out-of-range values raise :class:`ConfigError` naming the file and
``[section] key``, e.g. ``config.toml: [finetune] scenario = 'foo' is not one of fixed,
updated``, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config_reader import ConfigError, TableReader, suggest_key

DTYPES = ("float64", "float32")
TOP_KEYS = ("seed", "dtype", "device")
RENDERS = ("image", "text", "none")
# Smooth activations only: influence functions need second derivatives of the loss.
ACTIVATIONS = ("tanh", "softplus", "gelu", "sigmoid")
SCENARIOS = ("fixed", "updated")
ARCHITECTURES = ("mlp", "cnn")
# Stage trainers: "newton" = full-batch L-BFGS, then trust-region Newton to a certified minimum;
# "adam", "sgd" = minibatch epochs (a fixed budget, no certified minimum).
OPTIMIZERS = ("newton", "adam", "sgd")
MINIBATCH_KEYS = ("epochs", "batch_size", "learning_rate", "momentum")
CNN_KEYS = ("channels", "kernel_size", "pool")
SOLVERS = ("exact", "cg", "lissa", "ekfac", "ekfac+cg")
FISHER_TYPES = ("true", "empirical", "expected")
CURVATURE_TYPES = ("hessian", "gauss_newton")
SCORING_METHODS = ("auto", "layerwise", "jvp", "gradients")
MEASUREMENTS = ("loss", "margin", "log_prob")
TEST_POINT_MODES = ("all", "misclassified")
MAP_METHODS = ("umap", "pca")


MAX_HIDDEN = 65_536


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the three tables are and which columns mean what."""

    pretrain: Path
    finetune_train: Path
    finetune_test: Path
    id_column: str = "example_id"
    label_column: str = "label"
    feature_prefix: str | None = "px_"  # None when feature_columns is given
    feature_columns: tuple[str, ...] | None = None
    metadata_columns: tuple[str, ...] = ()
    text_column: str | None = None  # "" in the TOML
    pretrain_classes: tuple[int | str, ...] = tuple(range(10))
    finetune_classes: tuple[int | str, ...] = ("even", "odd")
    render: str = "image"
    image_shape: tuple[int, ...] = (8, 8)
    standardize: bool = False  # z-score features with the pretraining table's mean and std


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: MLP or CNN backbone; its output is the last hidden (fully connected) layer.

    ``cnn``: the flat features are reshaped to ``[data] image_shape``, then one convolution
    (``kernel_size``, padding ``(kernel_size - 1) // 2``) + activation + ``pool x pool`` average
    pooling per entry of ``channels``, then the ``hidden`` fully connected layers.
    """

    architecture: str = "mlp"
    hidden: tuple[int, ...] = (32,)
    activation: str = "tanh"
    channels: tuple[int, ...] = (16, 32)   # cnn only
    kernel_size: int = 5                   # cnn only
    pool: int = 2                          # cnn only; 1 = no pooling


@dataclass(frozen=True)
class StageConfig:
    """``[pretrain]``: L2-regularised training of one stage (``optimizer``: L-BFGS + Newton, or
    minibatch adam / sgd) and its curvature backend."""

    weight_decay: float = 1e-2
    damping: float = 0.0
    max_iter: int = 2000
    tolerance: float = 1e-7  # gradient-norm tolerance for L-BFGS
    # Curvature backend of this stage; when a file leaves it out, "[influence] solver" (the old
    # key for both stages) or "exact".
    solver: str = "exact"
    fisher: str = "true"            # ekfac, ekfac+cg: how the Kronecker factors are fitted
    relative_damping: float = 0.1   # ekfac, ekfac+cg: extra damping x mean EK-FAC eigenvalue
    cg_iterations: int = 20         # ekfac+cg: preconditioned CG iterations
    factor_examples: int = 0        # ekfac, ekfac+cg: fit the factors on this many evenly
                                    # spaced examples (0 = all; the fit's cost scales with it)
    curvature: str = "hessian"      # or "gauss_newton" (PSD, an approximation)
    # Trainer: "newton" (max_iter, tolerance) or minibatch "adam" / "sgd" (the keys below).
    optimizer: str = "newton"
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1e-3     # default 1e-3 for adam, 1e-2 for sgd
    momentum: float = 0.9           # sgd only


@dataclass(frozen=True)
class FinetuneConfig(StageConfig):
    """``[finetune]``: a stage plus whether (and how strongly tied) the backbone is updated."""

    weight_decay: float = 1e-3
    scenario: str = "fixed"
    alpha: float = 1.0  # proximal coefficient, only used by scenario = "updated"


@dataclass(frozen=True)
class InfluenceConfig:
    """``[influence]``: how scores are computed and for which test points."""

    solver: str = "exact"
    measurement: str = "loss"
    test_points: str | tuple[str, ...] = "all"  # "all", "misclassified" or test ids
    batch_size: int = 512
    tracked_backbone: str | tuple[str, ...] = "all"  # "all" or backbone parameter names
    scoring_method: str = "auto"
    direction_rank: int | None = None  # None: exact scores; r >= 1: rank-r approximation
    curvature_batch_size: int = 1024   # examples per Hessian-vector product batch (at most)
    memory_budget_gb: float = 4.0      # GiB per batched curvature / scoring intermediate
    # Also score the finetuning examples (engine.finetune_influence: finetune_scores.npy).
    finetune_influence: bool = True


@dataclass(frozen=True)
class MapConfig:
    """``[map]``: the 2-D map of examples shown in the dashboard."""

    method: str = "umap"
    n_neighbors: int = 15
    min_dist: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    """A complete, validated run configuration."""

    data: DataConfig
    seed: int = 0
    dtype: str = "float64"
    # "cpu", "cuda", "cuda:N" or "auto" (engine.devices.resolve_device, at run time)
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: StageConfig = field(default_factory=StageConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    map: MapConfig = field(default_factory=MapConfig)
    path: Path | None = None  # the config file this was loaded from

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (paths as strings, tuples as lists), e.g. for a manifest."""
        return _plain(self)

    def with_overrides(self, scenario: str | None = None, alpha: float | None = None,
                       device: str | None = None) -> RunConfig:
        """Copy with command-line overrides applied (None leaves a value as configured).

        Raises:
            ConfigError: for an invalid override value.
        """
        cfg = self
        if device is not None:
            cfg = dataclasses.replace(self, device=TableReader("command-line override", None, {})
                                      .check_device("device", device))
        return cfg._with_finetune_overrides(scenario, alpha)

    def _with_finetune_overrides(self, scenario: str | None, alpha: float | None) -> RunConfig:
        changes: dict[str, Any] = {}
        r = TableReader("command-line override", "finetune", {})
        if scenario is not None:
            changes["scenario"] = r.check_choice("scenario", scenario, SCENARIOS)
        if alpha is not None:
            changes["alpha"] = r.check_float("alpha", alpha, low=0.0, strict=True)
        if not changes:
            return self
        if changes.get("scenario") == "updated" and self.finetune.solver == "ekfac":
            r.fail("scenario", "updated", "needs [finetune] solver 'ekfac+cg', 'cg' or 'exact': "
                   "a block-diagonal EK-FAC of B zeros the finetuned-model term")
        return dataclasses.replace(self, finetune=dataclasses.replace(self.finetune, **changes))


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a TOML run config; data paths are resolved against its directory.

    Raises:
        ConfigError: naming the file and the offending ``[section] key``.
    """
    path = Path(path)
    name = str(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{name}: config file not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory; pass the config.toml file inside it") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not valid UTF-8 text ({exc})") from None

    sections = {
        "data": None, "model": ModelConfig, "pretrain": StageConfig, "finetune": FinetuneConfig,
        "influence": InfluenceConfig, "map": MapConfig,
    }
    top = TableReader(name, None, raw)
    for key, value in raw.items():
        if key in sections or key in TOP_KEYS:
            continue
        kind = "section" if isinstance(value, dict) else "key"
        shown = f"[{key}]" if kind == "section" else key
        raise ConfigError(
            f"{name}: unknown {kind} {shown}{suggest_key(key, [*sections, *TOP_KEYS])} "
            f"(allowed: {', '.join(TOP_KEYS)}, {', '.join(f'[{s}]' for s in sections)})"
        )
    tables = {}
    for sec in sections:
        value = raw.get(sec, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: {sec} must be a [{sec}] section, not {value!r}")
        tables[sec] = TableReader(name, sec, value)

    base = path.resolve().parent
    # "[influence] solver" (the old single key) is the default of both stages' "solver".
    influence = _influence(tables["influence"])
    cfg = RunConfig(
        seed=top.get_int("seed", 0, low=0),
        dtype=top.get_choice("dtype", "float64", DTYPES),
        device=top.check_device("device", top.table.get("device", "cpu")),
        data=_data(tables["data"], base),
        model=_model(tables["model"]),
        pretrain=_stage(tables["pretrain"], StageConfig(), influence.solver),
        finetune=_finetune(tables["finetune"], influence.solver),
        influence=influence,
        map=_map(tables["map"]),
        path=path.resolve(),
    )
    _check_model_fits(name, cfg)
    return cfg


# --- sections --------------------------------------------------------------------------------


def _data(r: TableReader, base: Path) -> DataConfig:
    r.allow_only([f.name for f in dataclasses.fields(DataConfig)])
    d = DataConfig(Path(), Path(), Path())  # only for the defaults
    paths = {}
    for key in ("pretrain", "finetune_train", "finetune_test"):
        if key not in r.table:
            raise ConfigError(
                f"{r.file}: [data] {key} is required: the path of the {key.replace('_', ' ')} "
                "table (.parquet or .csv), relative to the config file's directory"
            )
        p = Path(r.get_str(key, "", nonempty=True)).expanduser()
        paths[key] = p if p.is_absolute() else (base / p).resolve()

    id_column = r.get_str("id_column", d.id_column, nonempty=True)
    label_column = r.get_str("label_column", d.label_column, nonempty=True)
    if id_column == label_column:
        r.fail("label_column", label_column, "must differ from [data] id_column")
    if "feature_prefix" in r.table and "feature_columns" in r.table:
        raise ConfigError(
            f"{r.file}: [data] feature_prefix and [data] feature_columns are both set; "
            "keep exactly one (a prefix such as 'px_', or an explicit list of columns)"
        )
    if "feature_columns" in r.table:
        prefix, columns = None, tuple(r.get_str_list("feature_columns", (), nonempty=True))
    else:
        prefix, columns = r.get_str("feature_prefix", d.feature_prefix, nonempty=True), None
    text_column = r.get_str("text_column", "") or None
    render = r.get_choice("render", d.render, RENDERS)
    if render == "text" and text_column is None:
        r.fail("render", render, "needs [data] text_column, the column holding the text")
    image_shape = tuple(r.get_int_list("image_shape", d.image_shape))
    if len(image_shape) not in (2, 3):
        r.fail("image_shape", list(image_shape),
               "must be [height, width] or [height, width, channels]")
    return DataConfig(
        **paths,
        id_column=id_column,
        label_column=label_column,
        feature_prefix=prefix,
        feature_columns=columns,
        metadata_columns=tuple(r.get_str_list("metadata_columns", ())),
        text_column=text_column,
        pretrain_classes=r.get_classes("pretrain_classes", d.pretrain_classes),
        finetune_classes=r.get_classes("finetune_classes", d.finetune_classes),
        render=render,
        image_shape=image_shape,
        standardize=r.get_bool("standardize", d.standardize),
    )


def _model(r: TableReader) -> ModelConfig:
    r.allow_only([f.name for f in dataclasses.fields(ModelConfig)])
    d = ModelConfig()
    architecture = r.get_choice("architecture", d.architecture, ARCHITECTURES)
    hidden = r.get_int_list("hidden", d.hidden)
    if max(hidden) > MAX_HIDDEN:
        r.fail("hidden", hidden, f"has a layer wider than {MAX_HIDDEN} units; the built-in MLP "
                                 "is for models that fit in memory (bring your own modules "
                                 "through the Python API for larger ones)")
    if architecture != "cnn":
        for key in CNN_KEYS:
            if key in r.table:
                r.fail(key, r.table[key], f"only applies to architecture = 'cnn' (this model is "
                                          f"{architecture!r}); remove it or set architecture = "
                                          "'cnn'")
    channels = r.get_int_list("channels", d.channels)
    if max(channels) > MAX_HIDDEN:
        r.fail("channels", channels, f"has a convolution wider than {MAX_HIDDEN} channels")
    return ModelConfig(
        architecture=architecture, hidden=tuple(hidden),
        activation=r.get_choice("activation", d.activation, ACTIVATIONS),
        channels=tuple(channels), kernel_size=r.get_int("kernel_size", d.kernel_size, low=1),
        pool=r.get_int("pool", d.pool, low=1))


def _check_model_fits(file: str, cfg: RunConfig) -> None:
    """A CNN's convolutions must leave at least a 1x1 map of the configured image."""
    m, shape = cfg.model, cfg.data.image_shape
    if m.architecture != "cnn":
        return
    from engine.models import cnn_fit_problem  # torch is imported only when a CNN is configured

    problem = cnn_fit_problem(shape, m.channels, m.kernel_size, m.pool)
    if problem:
        raise ConfigError(
            f"{file}: [model] channels = {list(m.channels)} with kernel_size = {m.kernel_size} "
            f"and pool = {m.pool} does not fit [data] image_shape = {list(shape)}: {problem}; "
            "use fewer channels entries, a smaller kernel_size or pool, or check image_shape")


def _optimizer_values(r: TableReader, d: StageConfig) -> dict[str, Any]:
    """The stage's trainer and, for adam / sgd, its minibatch settings."""
    optimizer = r.get_choice("optimizer", d.optimizer, OPTIMIZERS)
    allowed = {"newton": (), "adam": MINIBATCH_KEYS[:3], "sgd": MINIBATCH_KEYS}[optimizer]
    for key in MINIBATCH_KEYS:
        if key in r.table and key not in allowed:
            needs = "optimizer = 'sgd'" if key == "momentum" else "optimizer = 'adam' or 'sgd'"
            r.fail(key, r.table[key], f"only applies to {needs} (this stage uses "
                                      f"{optimizer!r}); remove it or change [{r.section}] "
                                      "optimizer")
    return dict(
        optimizer=optimizer,
        epochs=r.get_int("epochs", d.epochs, low=1),
        batch_size=r.get_int("batch_size", d.batch_size, low=1),
        learning_rate=r.get_float("learning_rate", 1e-2 if optimizer == "sgd" else
                                  d.learning_rate, low=0.0, strict=True),
        momentum=r.get_float("momentum", d.momentum, low=0.0, high=0.999),
    )


def _stage_values(r: TableReader, d: StageConfig, default_solver: str) -> dict[str, Any]:
    return dict(
        weight_decay=r.get_float("weight_decay", d.weight_decay, low=0.0),
        damping=r.get_float("damping", d.damping, low=0.0),
        max_iter=r.get_int("max_iter", d.max_iter, low=1),
        tolerance=r.get_float("tolerance", d.tolerance, low=0.0, strict=True),
        solver=r.get_choice("solver", default_solver, SOLVERS),
        fisher=r.get_choice("fisher", d.fisher, FISHER_TYPES),
        relative_damping=r.get_float("relative_damping", d.relative_damping, low=0.0),
        cg_iterations=r.get_int("cg_iterations", d.cg_iterations, low=1),
        factor_examples=r.get_int("factor_examples", d.factor_examples, low=0),
        curvature=r.get_choice("curvature", d.curvature, CURVATURE_TYPES),
        **_optimizer_values(r, d),
    )


def _stage(r: TableReader, d: StageConfig, default_solver: str) -> StageConfig:
    r.allow_only([f.name for f in dataclasses.fields(StageConfig)])
    return StageConfig(**_stage_values(r, d, default_solver))


def _finetune(r: TableReader, default_solver: str) -> FinetuneConfig:
    r.allow_only([f.name for f in dataclasses.fields(FinetuneConfig)])
    d = FinetuneConfig()
    values = _stage_values(r, d, default_solver)
    scenario = r.get_choice("scenario", d.scenario, SCENARIOS)
    if values["solver"] == "ekfac" and scenario == "updated":
        r.fail("solver", "ekfac", "would block-diagonalise B across the head T and the backbone "
               "U, which zeros the finetuned-model term in the updated scenario; use "
               "'ekfac+cg' (CG on exact products, EK-FAC preconditioned), 'cg' or 'exact'")
    return FinetuneConfig(
        **values,
        scenario=scenario,
        # Checked even under "fixed" so switching to --scenario updated cannot hit a bad alpha.
        alpha=r.get_float("alpha", d.alpha, low=0.0, strict=True),
    )


def _influence(r: TableReader) -> InfluenceConfig:
    r.allow_only([f.name for f in dataclasses.fields(InfluenceConfig)])
    d = InfluenceConfig()
    return InfluenceConfig(
        solver=r.get_choice("solver", d.solver, SOLVERS),
        measurement=r.get_choice("measurement", d.measurement, MEASUREMENTS),
        test_points=r.get_mode_or_list("test_points", TEST_POINT_MODES, "test ids", ids=True),
        batch_size=r.get_int("batch_size", d.batch_size, low=1),
        tracked_backbone=r.get_mode_or_list("tracked_backbone", ("all",), "parameter names"),
        scoring_method=r.get_choice("scoring_method", d.scoring_method, SCORING_METHODS),
        direction_rank=(r.get_int("direction_rank", 1, low=1)
                        if "direction_rank" in r.table else None),
        curvature_batch_size=r.get_int("curvature_batch_size", d.curvature_batch_size, low=1),
        memory_budget_gb=r.get_float("memory_budget_gb", d.memory_budget_gb, low=0.0,
                                     strict=True),
        finetune_influence=r.get_bool("finetune_influence", d.finetune_influence),
    )


def _map(r: TableReader) -> MapConfig:
    r.allow_only([f.name for f in dataclasses.fields(MapConfig)])
    d = MapConfig()
    return MapConfig(
        method=r.get_choice("method", d.method, MAP_METHODS),
        n_neighbors=r.get_int("n_neighbors", d.n_neighbors, low=2),
        min_dist=r.get_float("min_dist", d.min_dist, low=0.0, high=1.0),
    )


def _plain(obj: Any) -> Any:
    """Dataclasses -> dicts, Paths -> str, tuples -> lists, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
