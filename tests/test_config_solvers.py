"""Per-stage curvature settings in the run config: parsing, the old key, refusals."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, load_config
from engine.curvature import EkfacCgSolver, EkfacSolver, ExactSolver
from engine.pipeline import stage_solver
from tests.conftest import SAMPLE_CONFIG


def config_with(tmp_path, pretrain: str = "", finetune: str = "", influence: str = ""):
    text = SAMPLE_CONFIG.read_text()
    text = text.replace("[pretrain]\n", f"[pretrain]\n{pretrain}\n")
    text = text.replace("[finetune]\n", f"[finetune]\n{finetune}\n")
    text = text.replace('[influence]\nsolver = "exact"\n', f"[influence]\n{influence}\n")
    for name in ("pretrain.parquet", "finetune_train.parquet", "finetune_test.parquet"):
        text = text.replace(f'"{name}"', f'"{SAMPLE_CONFIG.parent / name}"')
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_per_stage_solvers_and_their_options(tmp_path):
    cfg = load_config(config_with(
        tmp_path, pretrain='solver = "ekfac+cg"\ncg_iterations = 7\nfisher = "empirical"\n'
        'curvature = "gauss_newton"', finetune='solver = "ekfac"\nrelative_damping = 0.5'))
    assert (cfg.pretrain.solver, cfg.pretrain.cg_iterations, cfg.pretrain.fisher) == (
        "ekfac+cg", 7, "empirical")
    assert cfg.pretrain.curvature == "gauss_newton" and cfg.finetune.curvature == "hessian"
    pre, ft = stage_solver(cfg.pretrain, seed=3), stage_solver(cfg.finetune)
    assert isinstance(pre, EkfacCgSolver) and pre.iterations == 7 and pre.seed == 3
    assert isinstance(ft, EkfacSolver) and ft.relative_damping == 0.5


def test_old_influence_solver_key_is_the_default_of_both_stages(tmp_path):
    cfg = load_config(config_with(tmp_path, influence='solver = "cg"'))
    assert cfg.pretrain.solver == cfg.finetune.solver == "cg"
    cfg = load_config(config_with(tmp_path, pretrain='solver = "ekfac"',
                                  influence='solver = "cg"'))
    assert (cfg.pretrain.solver, cfg.finetune.solver) == ("ekfac", "cg")
    cfg = load_config(config_with(tmp_path))
    assert isinstance(stage_solver(cfg.pretrain), ExactSolver)


def test_factor_examples_subsample_the_fit(tmp_path):
    """``factor_examples`` = N fits the factors on N evenly spaced examples (recorded)."""
    from engine.curvature import pretrain_hessian
    from engine.pipeline import build_task, prepare_data
    from engine.training import fit_from_modules

    cfg = load_config(config_with(tmp_path, pretrain='solver = "ekfac"\nfactor_examples = 200'))
    assert cfg.pretrain.factor_examples == 200
    solver = stage_solver(cfg.pretrain)
    assert solver.max_examples == 200
    assert stage_solver(load_config(config_with(tmp_path, pretrain='solver = "ekfac"'))
                        .pretrain).max_examples is None
    task = build_task(prepare_data(cfg))
    op = pretrain_hessian(task, fit_from_modules(task))   # any point: only the fit's rows count
    assert solver.factors(op).describe()["factor_examples"] == 200 < op.n_examples


@pytest.mark.parametrize(("section", "line", "words"), [
    ("pretrain", "factor_examples = -1", "[pretrain] factor_examples"),
    ("pretrain", 'solver = "kfac"', "[pretrain] solver = 'kfac' is not one of"),
    ("pretrain", 'fisher = "sampled"', "[pretrain] fisher"),
    ("finetune", "cg_iterations = 0", "[finetune] cg_iterations"),
    ("pretrain", "relative_damping = -1", "[pretrain] relative_damping"),
    ("pretrain", 'curvature = "fisher"', "[pretrain] curvature"),
])
def test_bad_curvature_settings_name_the_key(tmp_path, section, line, words):
    with pytest.raises(ConfigError) as info:
        load_config(config_with(tmp_path, **{section: line}))
    assert words in str(info.value)


def test_ekfac_for_b_in_the_updated_scenario_is_refused_up_front(tmp_path):
    path = config_with(tmp_path, finetune='solver = "ekfac"')
    path.write_text(path.read_text().replace('scenario = "fixed"', 'scenario = "updated"'))
    with pytest.raises(ConfigError, match="ekfac\\+cg"):
        load_config(path)
    cfg = load_config(config_with(tmp_path, finetune='solver = "ekfac"'))
    with pytest.raises(ConfigError, match="finetuned-model term"):
        cfg.with_overrides(scenario="updated")
