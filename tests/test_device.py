"""The ``device`` setting (engine.devices): config, resolution, manifest, tensors on the device.

There is no GPU on the test machines, so CUDA is exercised through its errors and through
``torch.cuda`` monkeypatched to report GPUs; that the engine's tensors follow the task's device
is checked by :class:`FactoryAudit`, which records every tensor factory call (``torch.zeros``,
``torch.randn``, ...) made by engine code without an explicit ``device``: on a GPU each such
tensor would land on the CPU and stop the run at its first mixed-device operation.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine import artifacts
from engine.cli import main as cli_main
from engine.config import ConfigError, load_config
from engine.curvature import CGSolver, EkfacSolver, ExactSolver, LissaSolver, pretrain_hessian
from engine.curvature.errors import SolverSettingError
from engine.devices import DeviceError, numerics, resolve_device, to_host
from engine.distributed import DistContext
from engine.pipeline import run as make_run
from engine.scores import InfluenceArguments, compute_scores
from engine.task import TaskError, TwoStageTask
from engine.training import MinibatchSettings, fit_two_stage
from tests.conftest import ROOT, mlp_task
from tests.test_data_config import MINIMAL_DATA, config_error, write_config
from tests.test_validation import write_tiny_data

ENGINE = ROOT / "engine"
TORCH = Path(torch.__file__).parent


# ----- config ---------------------------------------------------------------------------------

def test_device_defaults_to_cpu_and_accepts_every_form(tmp_path):
    assert load_config(write_config(tmp_path, MINIMAL_DATA)).device == "cpu"
    for spec in ("cpu", "cuda", "cuda:1", "auto"):
        cfg = load_config(write_config(tmp_path, f'device = "{spec}"\n' + MINIMAL_DATA))
        assert cfg.device == spec and cfg.to_dict()["device"] == spec


@pytest.mark.parametrize("value, problem", [
    ('"gpu"', "device = 'gpu' is not one of cpu, cuda, cuda:N, auto"),
    ('"cuda:x"', "device = 'cuda:x' is not one of"),
    ("0", "device = 0 must be a string"),
])
def test_a_malformed_device_is_a_one_line_error_naming_the_key(tmp_path, value, problem):
    msg = config_error(tmp_path, f"device = {value}\n" + MINIMAL_DATA)
    assert "config.toml: " + problem in msg and "\n" not in msg


def test_device_is_listed_with_the_top_level_keys_and_overridable(tmp_path):
    assert "did you mean 'device'" in config_error(tmp_path, 'devise = "cpu"\n' + MINIMAL_DATA)
    cfg = load_config(write_config(tmp_path, MINIMAL_DATA))
    assert cfg.with_overrides(device="auto").device == "auto"
    with pytest.raises(ConfigError, match="command-line override: device = 'tpu'"):
        cfg.with_overrides(device="tpu")


# ----- resolution -----------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_is_the_cpu_here():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(None) == torch.device("cpu")


def test_cuda_without_cuda_is_an_error_that_says_what_to_do(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError) as err:
            resolve_device(spec)
        msg = str(err.value)
        assert f"device = {spec!r}" in msg and "torch.cuda.is_available() is False" in msg
        assert 'set device = "cpu"' in msg and "CUDA build of PyTorch" in msg


def test_cuda_settings_pick_the_gpu(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="no GPU 2 here"):
        resolve_device("cuda:2")
    # under torchrun each rank takes its local GPU; one explicit GPU for all ranks is refused
    rank1 = DistContext(rank=1, world_size=2, backend="nccl", local_rank=1)
    assert resolve_device("cuda", rank1) == resolve_device("auto", rank1) == torch.device(
        "cuda", 1)
    with pytest.raises(DeviceError, match="same GPU"):
        resolve_device("cuda:0", rank1)


def test_numerics_record_the_float32_settings_in_effect():
    rec = numerics(torch.device("cpu"))
    assert rec["device"] == "cpu"
    assert rec["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert rec["cuda_matmul_allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert rec["cudnn_allow_tf32"] == torch.backends.cudnn.allow_tf32


def test_to_host_gives_numpy_in_host_memory():
    t = torch.arange(4.0, requires_grad=True) * 2
    out = to_host(t)
    assert isinstance(out, np.ndarray) and out.tolist() == [0.0, 2.0, 4.0, 6.0]


# ----- the Python API -------------------------------------------------------------------------

def test_the_task_is_on_its_modules_device_and_refuses_data_elsewhere():
    task, _, _ = mlp_task()
    assert task.device == torch.device("cpu")
    assert all(v.device == task.device for v in task.initial_state())
    x, y = task.pretrain_data
    with pytest.raises(TaskError, match="one device.*pretrain_data inputs on meta"):
        TwoStageTask(task.backbone, task.pretrain_head, task.finetune_head,
                     (x.to("meta"), y), task.finetune_data)


def test_ekfac_refuses_a_device_it_does_not_run_on():
    task, _, _ = mlp_task()
    fit = fit_two_stage(task)
    h = pretrain_hessian(task, fit)
    h.point = h.point.to("meta")     # what a CUDA task's operator looks like to the check
    with pytest.raises(SolverSettingError, match="does not run on meta.*'cg' or 'exact'"):
        EkfacSolver().factors(h)


class FactoryAudit(TorchFunctionMode):
    """Records ``file:line`` of tensor factory calls without ``device=`` made from ``roots``."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.eye, torch.arange,
                 torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint,
                 torch.randperm, torch.tensor, torch.as_tensor}

    def __init__(self, roots: tuple[Path, ...] = (ENGINE,)) -> None:
        super().__init__()
        self.roots = tuple(str(r) for r in roots)
        self.calls: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # as_tensor / tensor of a tensor keep its device
        from_tensor = func in (torch.tensor, torch.as_tensor) and args and isinstance(
            args[0], torch.Tensor)
        if func in self.FACTORIES and "device" not in kwargs and not from_tensor:
            # the caller: the first frame outside torch and outside (nested) function modes
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith(str(TORCH))
                                         or frame.f_code.co_name == "__torch_function__"):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(self.roots):
                self.calls.add(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **kwargs)


def test_the_factory_audit_sees_calls_without_a_device():
    with FactoryAudit(roots=(Path(__file__),)) as audit:
        torch.zeros(2, device="cpu")
        torch.as_tensor(torch.ones(2, device="cpu"))
        torch.randn(3)
    assert len(audit.calls) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")   # 1 adam epoch, 5 LiSSA steps: inexact
@pytest.mark.parametrize("scenario", ["fixed", "updated"])
def test_engine_tensors_follow_the_task_device(scenario):
    """Training (certified and minibatch), curvature products and every solver but EK-FAC, and
    each scoring method create no tensor without naming its device."""
    task, x_test, y_test = mlp_task(scenario=scenario, m=60)
    solvers = [ExactSolver(), CGSolver(rtol=1e-10), LissaSolver(depth=5, batch_size=16,
                                                                  scale=50.0, fail_residual=10)]
    with FactoryAudit() as audit:
        fit = fit_two_stage(task)
        fit_two_stage(task, optimizer=(MinibatchSettings(epochs=1, batch_size=16), None))
        for solver, method in zip(solvers, ("layerwise", "jvp", "gradients"), strict=True):
            scores = compute_scores(task, fit, x_test, y_test, InfluenceArguments(
                pretrain_solver=solver, finetune_solver=ExactSolver(), scoring_method=method,
                pretrain_damping=0.1))
            assert scores.settings["device"] == "cpu" and scores.total.device == task.device
        h = pretrain_hessian(task, fit)
        h.dense()
    assert not audit.calls, sorted(audit.calls)


def test_ekfac_tensors_follow_the_task_device():
    """Every tensor the EK-FAC fit and solve create names its device (the random draws are
    made on the CPU on purpose, then moved)."""
    task, _, _ = mlp_task(m=60)
    h = pretrain_hessian(task, fit_two_stage(task))
    with FactoryAudit() as audit:
        EkfacSolver(fisher="true").solve(h, torch.ones(h.dim, 2, dtype=torch.float64), 0.1)
    assert not audit.calls, sorted(audit.calls)


# ----- the run command ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("device") / "data", n_pre=120, n_test=12)


def test_a_run_on_device_cpu_equals_one_without_the_key(tiny_config, tmp_path):
    """Bit-identical scores and parameters; the manifest records the device and float32
    settings; the pipeline's own tensors name their device."""
    plain = artifacts.load_run(make_run(tiny_config, tmp_path / "plain", echo=lambda _: None))
    explicit = tiny_config.with_name("explicit.toml")
    explicit.write_text('device = "cpu"\n' + tiny_config.read_text())
    with FactoryAudit() as audit:
        on_cpu = artifacts.load_run(make_run(explicit, tmp_path / "cpu", echo=lambda _: None))
    assert not audit.calls, sorted(audit.calls)
    for name in artifacts.SCORE_NAMES:
        np.testing.assert_array_equal(on_cpu.scores[name], plain.scores[name])
    a, b = artifacts.load_model_arrays(on_cpu), artifacts.load_model_arrays(plain)
    assert all(np.array_equal(a[k], b[k]) for k in b)
    for run, requested in ((plain, "cpu"), (on_cpu, "cpu")):
        assert run.manifest["device"] == {"requested": requested, **numerics(torch.device("cpu"))}
        assert run.manifest["config"]["device"] == requested


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("how", ["config", "flag"])
def test_run_on_cuda_without_cuda_fails_at_once_and_writes_nothing(tiny_config, tmp_path,
                                                                   capsys, how):
    config = tiny_config
    args = []
    if how == "config":
        config = tiny_config.with_name("cuda.toml")
        config.write_text('device = "cuda"\n' + tiny_config.read_text())
    else:
        args = ["--device", "cuda"]
    assert cli_main(["run", str(config), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: device = 'cuda' asks for a GPU")
    assert "torch.cuda.is_available() is False" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
