"""Command line: ``python -m engine run|validate|verify``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from engine import artifacts


def _cmd_run(ns: argparse.Namespace) -> None:
    from engine.config import load_config
    from engine.distributed import init_from_env, shutdown
    from engine.ids_file import read_ids_file
    from engine.pipeline import run, run_device

    # Under torchrun: one worker of the process group, NCCL when the run's device is a GPU,
    # gloo on the CPU (the device's type is known before the group; its index is not).
    parent = _parent_record(ns.parent) if ns.parent else None
    cfg = load_config(ns.config).with_overrides(device=ns.device)
    world = ns.world = init_from_env(run_device(cfg))
    try:
        exclude = read_ids_file(ns.exclude) if ns.exclude else []
        exclude_ft = read_ids_file(ns.exclude_finetune) if ns.exclude_finetune else []
        run(ns.config, ns.out, scenario=ns.scenario, alpha=ns.alpha, exclude_ids=exclude,
            exclude_finetune_ids=exclude_ft,
            overwrite=ns.overwrite, world=world, device=ns.device, yes=ns.yes, parent=parent,
            progress_file=ns.progress_file)
    finally:
        shutdown(world)


def _parent_record(path: str) -> dict[str, str]:
    """``{"run_id", "name"}`` of the run at ``path`` (``--parent``); one-line error if it is
    not a readable run."""
    try:
        manifest = artifacts.read_manifest(path)
    except artifacts.RunError as exc:
        raise artifacts.RunError(f"--parent {path} is not a readable run: {exc}") from None
    return {"run_id": str(manifest["run_id"]), "name": Path(path).resolve().name}


def _cmd_verify(ns: argparse.Namespace) -> None:
    r = artifacts.load_run(ns.run_dir)
    print(f"{r.path}: run {r.run_id} is complete and intact "
          f"({r.n_test} test points x {r.n_pretrain} pretraining examples)")


def _cmd_validate(ns: argparse.Namespace) -> None:
    from engine.validation import main as validate_main

    validate_main(ns)   # under torchrun the retrains are split over the ranks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine",
                                description="Multi-stage influence: pretraining data -> "
                                            "finetuned predictions.")
    p.add_argument("-v", "--verbose", action="store_true", help="log training details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train both stages, score, map and write a run directory")
    r.add_argument("config", help="TOML config (see sample_data/digits/config.toml)")
    r.add_argument("--out", required=True, help="run directory to create")
    r.add_argument("--scenario", choices=["fixed", "updated"], help="override [finetune] scenario")
    r.add_argument("--alpha", type=float, help="override [finetune] alpha (updated scenario)")
    r.add_argument("--exclude", metavar="IDS_FILE",
                   help="retrain without these pretraining example ids (one per line)")
    r.add_argument("--exclude-finetune", metavar="IDS_FILE",
                   help="finetune without these finetuning training example ids (one per line)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    r.add_argument("--device", help="override the config's device: cpu, cuda, cuda:N or auto")
    r.add_argument("--yes", action="store_true",
                   help="go ahead when --exclude (--exclude-finetune) removes more than half "
                        "the pretraining (finetuning training) data")
    r.add_argument("--parent", metavar="RUN_DIR",
                   help="record RUN_DIR as the run this one retrains (manifest `parent`)")
    r.add_argument("--progress-file", metavar="PATH",
                   help="append JSON lines of progress per phase to PATH (for a supervisor)")
    r.set_defaults(func=_cmd_run)

    v = sub.add_parser("verify", help="check a run directory's schema, shapes and hashes")
    v.add_argument("run_dir")
    v.set_defaults(func=_cmd_verify)

    val = sub.add_parser("validate", help="predicted vs actual influence by retraining")
    val.add_argument("run_dir")
    val.add_argument("--test-points", nargs="*", default=None,
                     help="test ids (default: up to 10 misclassified)")
    val.add_argument("--per-point", type=int, default=20,
                     help="top-N by |score| plus N random examples per test point")
    val.add_argument("--group-sizes", type=int, nargs="*", default=[10, 20, 50])
    val.add_argument("--random-draws", type=int, default=3)
    val.add_argument("--workers", type=int, default=None,
                     help="parallel retraining processes (default: min(2, CPUs))")
    val.add_argument("--seed", type=int, default=0,
                     help="seed of the test-point choice and of the random examples/groups")
    val.add_argument("--noise-ids", metavar="IDS_FILE", default=None,
                     help="mislabelled pretraining ids for the noise-detection check (default: "
                          "corrupted_ids.txt beside the pretraining file, when present)")
    val.add_argument("--tolerance", type=float, default=1e-10,
                     help="gradient-norm tolerance of every retrain, both stages")
    val.add_argument("--max-iter", type=int, default=300,
                     help="L-BFGS iterations per stage in a retrain's first round (then the "
                          "trainer's Newton polish)")
    val.add_argument("--max-rounds", type=int, default=5,
                     help="training rounds per retrain until the tolerance is met; each "
                          "continues the last with twice the iterations")
    val.add_argument("--source-column", metavar="COLUMN", default=None,
                     help="also retrain without each whole group of this pretraining column "
                          "(label or a metadata column) among the most harmful to the "
                          "misclassified points (summary group.sources)")
    val.add_argument("--source-groups", type=int, default=3,
                     help="how many of the most harmful groups --source-column retrains")
    val.add_argument("--finetune-per-point", type=int, default=10,
                     help="finetuning-data influence check: top-N by |score| plus N random "
                          "finetuning examples per test point, each removed and the finetuning "
                          "stage alone retrained (0 skips the check)")
    val.add_argument("--finetune-test-points", type=int, default=5,
                     help="misclassified test points of that check (default 5; --test-points, "
                          "when given, are used instead)")
    val.set_defaults(func=_cmd_validate)
    return p


def _rank_prefix(ns: argparse.Namespace, exc: BaseException) -> str:
    """``rank R of W: `` in a distributed run (every rank prints its own error), unless the
    error already names the ranks that failed."""
    world = getattr(ns, "world", None)
    if not (world and world.distributed) or type(exc).__name__ == "RankFailedError":
        return ""
    return f"rank {world.rank} of {world.world_size}: "


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so staging directories are removed on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        ns.func(ns)
    except KeyboardInterrupt as exc:
        print(f"interrupted; {exc.args[0] if exc.args else 'nothing was written'}",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        # Library errors carry the what-to-do message; a traceback would only hide it.
        print(f"error: {_rank_prefix(ns, exc)}{exc}", file=sys.stderr)
        return 2
    return 0
