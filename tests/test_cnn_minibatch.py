"""The CNN model family, minibatch (adam / sgd) training and their config keys, on tiny data.

Nothing here needs MNIST: the images are 8x8 synthetic patterns (bars, a diagonal, a square).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from engine.artifacts import load_run
from engine.config import ConfigError, load_config
from engine.models import ImageInput, build_model, cnn_backbone
from engine.pipeline import RunInputError, run
from engine.task import TwoStageTask
from engine.training import (
    MinibatchSettings,
    NotConvergedWarning,
    finetune_objective,
    finetune_stochastic_objective,
    fit_pretraining,
    fit_two_stage,
    pretrain_objective,
    pretrain_stochastic_objective,
)

SIDE = 8


def patterns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 8x8 images of 4 pattern classes, flat rows in [0, 1], and their classes."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 4, n)
    images = np.zeros((n, SIDE, SIDE))
    for i, c in enumerate(classes):
        k = rng.integers(1, SIDE - 1)
        if c == 0:
            images[i, k, :] = 1
        elif c == 1:
            images[i, :, k] = 1
        elif c == 2:
            np.fill_diagonal(images[i], 1)
        else:
            images[i, 2:6, 2:6] = 1
    images = np.clip(images + 0.2 * rng.standard_normal(images.shape), 0, 1)
    return images.reshape(n, -1), classes


def table(n: int, prefix: str, seed: int, finetune: bool) -> pd.DataFrame:
    x, c = patterns(n, seed)
    labels = [("line" if v < 2 else "other") if finetune else int(v) for v in c]
    frame = pd.DataFrame({"example_id": [f"{prefix}-{i:03d}" for i in range(n)],
                          "label": labels})
    pixels = pd.DataFrame(x.astype(np.float32), columns=[f"px_{j}" for j in range(SIDE ** 2)])
    return pd.concat([frame, pixels], axis=1)


DATA = """\
seed = 0
[data]
pretrain = "pre.parquet"
finetune_train = "ft.parquet"
finetune_test = "test.parquet"
pretrain_classes = [0, 1, 2, 3]
finetune_classes = ["line", "other"]
image_shape = [8, 8]
"""

CNN_RUN = DATA + """\
[model]
architecture = "cnn"
channels = [3, 4]
kernel_size = 3
pool = 2
hidden = [8]
[pretrain]
optimizer = "adam"
epochs = 4
batch_size = 32
learning_rate = 0.02
damping = 0.5
solver = "cg"
[finetune]
solver = "cg"
damping = 0.01
[influence]
test_points = ["test-000", "test-001", "test-002"]
[map]
method = "pca"
"""


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cnn_data")
    table(160, "pre", 0, False).to_parquet(d / "pre.parquet")
    table(40, "ft", 1, True).to_parquet(d / "ft.parquet")
    table(20, "test", 2, True).to_parquet(d / "test.parquet")
    return d


def write(d: Path, text: str, name: str = "config.toml") -> Path:
    (d / name).write_text(text)
    return d / name


def config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


# --- config ----------------------------------------------------------------------------------


def test_defaults_keep_the_mlp_and_the_certified_trainer(tmp_path):
    cfg = load_config(write(tmp_path, DATA))
    assert cfg.model.architecture == "mlp" and cfg.model.hidden == (32,)
    assert cfg.pretrain.optimizer == "newton" and cfg.finetune.optimizer == "newton"
    digits = load_config(Path(__file__).resolve().parents[1] / "sample_data/digits/config.toml")
    assert digits.model.architecture == "mlp" and digits.pretrain.optimizer == "newton"


def test_cnn_and_minibatch_keys_are_read(tmp_path):
    cfg = load_config(write(tmp_path, CNN_RUN))
    assert (cfg.model.architecture, cfg.model.channels, cfg.model.kernel_size,
            cfg.model.pool, cfg.model.hidden) == ("cnn", (3, 4), 3, 2, (8,))
    p = cfg.pretrain
    assert (p.optimizer, p.epochs, p.batch_size, p.learning_rate) == ("adam", 4, 32, 0.02)
    sgd = load_config(write(tmp_path, DATA + "[finetune]\noptimizer = 'sgd'\nmomentum = 0.5\n"))
    assert sgd.finetune.learning_rate == 1e-2 and sgd.finetune.momentum == 0.5  # sgd default lr
    adam = load_config(write(tmp_path, DATA + "[pretrain]\noptimizer = 'adam'\n"))
    assert adam.pretrain.learning_rate == 1e-3 and adam.pretrain.epochs == 5
    assert json.loads(json.dumps(cfg.to_dict()))["model"]["channels"] == [3, 4]


@pytest.mark.parametrize("extra, message", [
    ("[model]\narchitecture = 'resnet'\n",
     "[model] architecture = 'resnet' is not one of mlp, cnn"),
    ("[model]\narchitecture = 'cnn'\nchannels = []\n",
     "[model] channels = [] must be a non-empty list of positive integers"),
    ("[model]\narchitecture = 'cnn'\nchannels = [4, 0]\n", "[model] channels = [4, 0] must be"),
    ("[model]\narchitecture = 'cnn'\nkernel_size = 0\n", "[model] kernel_size = 0 must be >= 1"),
    ("[model]\narchitecture = 'cnn'\npool = 1.5\n", "[model] pool = 1.5 must be an integer"),
    ("[model]\nchannels = [4]\n", "[model] channels = [4] only applies to architecture = 'cnn'"),
    ("[model]\narchitecture = 'mlp'\npool = 2\n", "[model] pool = 2 only applies to"),
    ("[model]\narchitecture = 'cnn'\nchannels = [4, 4, 4, 4]\n",
     "[model] channels = [4, 4, 4, 4] with kernel_size = 5 and pool = 2 does not fit [data] "
     "image_shape = [8, 8]: the 8x8 image shrinks to 0x0 after convolution block 4 of 4"),
    ("[pretrain]\noptimizer = 'lbfgs'\n", "[pretrain] optimizer = 'lbfgs' is not one of newton, "
                                          "adam, sgd"),
    ("[pretrain]\noptimizer = 'adam'\nepochs = 0\n", "[pretrain] epochs = 0 must be >= 1"),
    ("[pretrain]\noptimizer = 'adam'\nbatch_size = 0\n", "[pretrain] batch_size = 0 must be >= 1"),
    ("[pretrain]\noptimizer = 'adam'\nlearning_rate = 0\n",
     "[pretrain] learning_rate = 0 must be > 0"),
    ("[pretrain]\noptimizer = 'adam'\nlearning_rate = 'fast'\n", "must be a number"),
    ("[pretrain]\noptimizer = 'adam'\nmomentum = 0.9\n",
     "[pretrain] momentum = 0.9 only applies to optimizer = 'sgd' (this stage uses 'adam')"),
    ("[finetune]\nepochs = 3\n", "[finetune] epochs = 3 only applies to optimizer = 'adam' or "
                                 "'sgd' (this stage uses 'newton')"),
    ("[finetune]\noptimizer = 'sgd'\nmomentum = 1.0\n", "[finetune] momentum = 1.0 must be <= "
                                                        "0.999"),
    ("[pretrain]\noptimiser = 'adam'\n", "(did you mean 'optimizer'?)"),
])
def test_bad_values_name_the_key(tmp_path, extra, message):
    msg = config_error(tmp_path, DATA + extra)
    assert message in msg and "config.toml" in msg and "\n" not in msg


def test_even_kernels_shrink_and_a_flat_image_runs_out_first(tmp_path):
    text = DATA.replace("image_shape = [8, 8]", "image_shape = [2, 32]") + (
        "[model]\narchitecture = 'cnn'\nchannels = [4, 4]\nkernel_size = 4\npool = 1\n")
    assert ("image_shape = [2, 32]: the 2x32 image shrinks to 0x30 after convolution block 2 of 2"
            in config_error(tmp_path, text))


def test_cnn_must_match_the_number_of_features(image_dir, tmp_path):
    text = CNN_RUN.replace('"pre.parquet"', f'"{image_dir}/pre.parquet"').replace(
        '"ft.parquet"', f'"{image_dir}/ft.parquet"').replace(
        '"test.parquet"', f'"{image_dir}/test.parquet"').replace(
        "image_shape = [8, 8]", "image_shape = [4, 16]\nrender = 'none'").replace(
        "image_shape = [4, 16]", "image_shape = [16, 5]")
    with pytest.raises(RunInputError, match=r"architecture = 'cnn' reshapes the features to "
                                            r"\[data\] image_shape = \[16, 5\] \(80 values\), "
                                            r"but the files have 64 feature columns"):
        run(write(tmp_path, text), tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out").exists()


# --- model -----------------------------------------------------------------------------------


def test_cnn_backbone_shapes_and_channel_layout():
    torch.manual_seed(0)
    net = cnn_backbone((8, 8), (3, 4), 3, 2, (8, 5))
    assert net(torch.rand(7, 64)).shape == (7, 5)
    # [height, width, channels] rows are channels-last: pixel (i, j) channel c at (i*W + j)*C + c.
    x = torch.arange(2 * 3 * 4 * 2, dtype=torch.float64).reshape(2, -1)
    img = ImageInput((3, 4, 2))(x)
    assert img.shape == (2, 2, 3, 4) and img[1, 1, 2, 3] == x[1, (2 * 4 + 3) * 2 + 1]
    with pytest.raises(ValueError, match="shrinks to 0x0 after convolution block 4 of 4"):
        cnn_backbone((8, 8), (4, 4, 4, 4), 5, 2, (8,))
    with pytest.raises(ValueError, match="the 2x32 image shrinks to 0x8 after convolution block 2"):
        cnn_backbone((2, 32), (4, 4), 3, 2, (8,))
    with pytest.raises(ValueError, match="must multiply to the number of features"):
        build_model(63, (8,), "tanh", 3, 2, architecture="cnn", image_shape=(8, 8),
                    channels=(2,), kernel_size=3, pool=2)
    mlp = build_model(64, (8,), "tanh", 3, 2)[0]  # the default family is unchanged
    assert [type(m) for m in mlp] == [nn.Linear, nn.Tanh]


# --- minibatch training ----------------------------------------------------------------------


def cnn_task(scenario: str = "fixed", n: int = 120) -> TwoStageTask:
    x, c = patterns(n, 5)
    xf, cf = patterns(40, 6)
    dt = torch.float64
    torch.manual_seed(0)
    backbone = cnn_backbone((8, 8), (3,), 3, 2, (6,)).to(dt)
    return TwoStageTask(
        backbone, nn.Linear(6, 4).to(dt), nn.Linear(6, 2).to(dt),
        (torch.as_tensor(x, dtype=dt), torch.as_tensor(c)),
        (torch.as_tensor(xf, dtype=dt), torch.as_tensor((cf < 2).astype(np.int64))),
        pretrain_weight_decay=1e-2, finetune_weight_decay=1e-3, scenario=scenario, alpha=0.5)


def test_stochastic_objectives_are_the_training_objectives():
    for scenario in ("fixed", "updated"):
        task = cnn_task(scenario)
        ub, w, t = task.initial_state()
        x, y = task.pretrain_data
        weights = torch.linspace(0.0, 2.0, len(x), dtype=torch.float64)
        theta = torch.cat([ub, w])
        full = pretrain_objective(task, x, y, weights)(theta)
        by_rows = pretrain_stochastic_objective(task, x, y, weights)
        value, grad = by_rows.value_and_grad(theta, chunk=50)
        theta_g = theta.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(pretrain_objective(task, x, y, weights)(theta_g),
                                          theta_g)
        assert math.isclose(value, full.item(), rel_tol=1e-12)
        assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)
        ft_point = t if scenario == "fixed" else torch.cat([t, ub + 0.1])
        xf, yf = task.finetune_data
        full_ft = finetune_objective(task, ub, xf, yf)(ft_point).item()
        value_ft, _ = finetune_stochastic_objective(task, ub, xf, yf, chunk=7).value_and_grad(
            ft_point, chunk=16)
        assert math.isclose(value_ft, full_ft, rel_tol=1e-12)


class Recorder:
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.steps: list[tuple] = []

    def step(self, stage, phase, done, limit, grad_norm, detail=""):
        self.steps.append((stage, phase, done, limit, grad_norm, detail))

    def note(self, stage, message):
        self.notes.append(f"{stage}: {message}")


@pytest.mark.parametrize("optimizer, lr", [("adam", 0.02), ("sgd", 0.1)])
def test_minibatch_training_is_deterministic_and_lowers_the_objective(optimizer, lr):
    task = cnn_task()
    settings = MinibatchSettings(optimizer, epochs=4, batch_size=16, learning_rate=lr, seed=3)
    ub, w, _ = task.initial_state()
    x, y = task.pretrain_data
    start = pretrain_objective(task, x, y)(torch.cat([ub, w])).item()
    fits = []
    for _ in range(2):
        monitor = Recorder()
        with pytest.warns(NotConvergedWarning, match=f"trained with {optimizer} for 4 epoch"):
            fits.append(fit_pretraining(task, optimizer=settings, monitor=monitor))
    a, b = fits
    assert torch.equal(a.params, b.params)                      # bit-identical
    assert a.final_objective < 0.9 * start
    assert a.status == f"not certified ({optimizer}, 4 epochs)" and not a.converged
    assert a.iterations == 4 * math.ceil(120 / 16) and a.optimizer == optimizer
    assert a.min_eigenvalue is None and a.curvature is None
    theta = a.params.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pretrain_objective(task, x, y)(theta), theta)
    assert math.isclose(a.final_grad_norm, g.norm().item(), rel_tol=1e-9)  # full-batch norm
    summary = a.summary()
    assert summary["status"] == a.status and summary["epochs"] == 4
    assert summary["converged"] is False and summary["optimizer"] == optimizer
    epochs = [n for n in monitor.notes if " done in " in n]
    assert len(epochs) == 4 and all("ETA" in n for n in epochs)
    assert "epoch 4/4 done" in epochs[-1]
    # Another seed shuffles differently.
    other = MinibatchSettings(optimizer, epochs=4, batch_size=16, learning_rate=lr, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        assert not torch.equal(fit_pretraining(task, optimizer=other).params, a.params)


def test_minibatch_both_stages_updated_scenario_keeps_the_proximal_term():
    task = cnn_task("updated")
    settings = MinibatchSettings("adam", epochs=3, batch_size=16, learning_rate=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        fit = fit_two_stage(task, optimizer=(settings, settings))
    assert fit.pretrain.status == fit.finetune.status == "not certified (adam, 3 epochs)"
    xf, yf = task.finetune_data
    point = torch.cat([fit.t, fit.backbone_ft])
    expected = finetune_objective(task, fit.backbone_pre, xf, yf)(point).item()
    assert math.isclose(fit.finetune.final_objective, expected, rel_tol=1e-12)
    assert not torch.equal(fit.backbone_ft, fit.backbone_pre)


def test_minibatch_settings_are_checked():
    for bad in (dict(optimizer="newton"), dict(epochs=0), dict(learning_rate=0.0),
                dict(momentum=1.0), dict(batch_size=0)):
        with pytest.raises(ValueError):
            MinibatchSettings(**bad)


# --- pipeline --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_run(image_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    lines: list[str] = []
    out = tmp_path_factory.mktemp("cnn_runs") / "cnn"
    path = run(write(image_dir, CNN_RUN, "cnn.toml"), out, echo=lines.append)
    return path, lines


def test_cnn_adam_run_writes_a_valid_run(cnn_run):
    path, lines = cnn_run
    loaded = load_run(path)                                   # schema, hashes and shapes
    m = loaded.manifest
    pre, ft = m["stages"]["pretrain"], m["stages"]["finetune"]
    assert pre["status"] == "not certified (adam, 4 epochs)" and pre["converged"] is False
    assert pre["optimizer"] == "adam" and pre["epochs"] == 4 and pre["iterations"] == 20
    assert pre["solver"] == "cg" and pre["damping"] == 0.5
    assert pre["min_eigenvalue"] is None and math.isfinite(pre["final_grad_norm"])
    assert ft["optimizer"] == "newton" and ft["status"] == "minimum" and ft["converged"]
    assert m["config"]["model"]["architecture"] == "cnn"
    assert m["render"] == {"kind": "image", "column": "pixels", "shape": [8, 8]}
    assert any("trained with adam for 4 epoch(s)" in line for line in lines)
    total = np.load(path / "scores" / "total.npy")
    terms = (np.load(path / "scores" / "pretrained_term.npy")
             + np.load(path / "scores" / "finetuned_term.npy"))
    assert total.shape == (3, 160) and np.isfinite(total).all()
    assert np.allclose(total, terms, atol=1e-6)
    assert np.abs(total).max() > 0


def test_dashboard_overview_says_the_stage_is_not_certified(cnn_run, monkeypatch):
    from tests.apptest_pages import open_page

    path, _ = cnn_run
    monkeypatch.setenv("INFLUENCE_RUNS_DIR", str(path.parent))
    at = open_page(query={"run": path.name})
    warning = "\n".join(str(w.value) for w in at.warning)
    assert "The pretrain stage is not certified as a minimum" in warning
    assert "not certified (adam, 4 epochs), 20 minibatch steps" in warning
    assert "did not converge" not in warning        # that wording is for the certified trainer
    at = open_page("views/test_point.py", {"run": path.name})
    assert not at.exception


def test_mnist_sample_config_parses_and_its_cnn_fits_28x28():
    cfg = load_config(Path(__file__).resolve().parents[1] / "sample_data/mnist/config.toml")
    m = cfg.model
    assert m.architecture == "cnn" and cfg.data.image_shape == (28, 28)
    assert cfg.pretrain.optimizer == "adam" and cfg.finetune.optimizer == "newton"
    backbone, head, _ = build_model(784, m.hidden, m.activation, 10, 2, architecture="cnn",
                                    image_shape=(28, 28), channels=m.channels,
                                    kernel_size=m.kernel_size, pool=m.pool)
    n = sum(p.numel() for p in backbone.parameters())
    assert 100_000 <= n <= 300_000
    names = dict(backbone.named_parameters())
    tracked = cfg.influence.tracked_backbone
    # EK-FAC scales to the whole backbone; a named subset must exist in the model
    assert tracked == "all" or set(tracked) <= set(names)
    assert cfg.pretrain.solver == "ekfac"
    assert backbone(torch.rand(2, 784)).shape == (2, m.hidden[-1])
