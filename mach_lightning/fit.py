"""Train one run: `python -m mach_lightning.fit --config configs/sync.yaml [key=value ...]`.

The command line only: arguments are parsed before torch and Lightning are imported, so `--help`
answers at once. The run itself is `training.run_fit`.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_USAGE, EXIT_DIVERGED, EXIT_DISK_FULL, EXIT_PREEMPTED = 2, 3, 4, 143
EXIT_DIST = 5  # runtime.name=dist: a component process failed or hung (the message names it)

# `from mach_lightning.fit import run_fit` (and the other training names) keeps working.
_TRAINING_NAMES = {"run_fit", "build_trainer", "build_callbacks", "ProgressBar", "LastCheckpoint"}


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from mach_lightning import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mach_lightning.fit",
        description="Train one run. Settings: configs/default.yaml; override with key=value.",
    )
    parser.add_argument("--config", help="experiment file layered over configs/default.yaml")
    parser.add_argument("--list", action="store_true", help="list topologies and datasets")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds arbitrary Python objects (runs its code: only for "
        "files from a source you trust)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. seed=1")
    return parser.parse_intermixed_args(argv)  # key=value before --config works too


def _summary(result: dict) -> str:
    metrics = result["metrics"]
    accs = ", ".join(
        f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if "acc" in k and isinstance(v, float)
    )
    return f"run directory: {result['run_dir']}\n{accs}"


def _list() -> int:
    from mach_lightning.data import list_datasets
    from mach_lightning.methods import list_topologies

    print("topologies:", ", ".join(list_topologies()))
    print("datasets:  ", ", ".join(list_datasets()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        return _list()
    import mach_lightning.methods  # noqa: F401  (registers the sections load_config composes)
    from mach_lightning.atomic import DiskFullError
    from mach_lightning.checkpoint_io import CheckpointError
    from mach_lightning.config import ConfigError, load_config
    from mach_lightning.data import DataError
    from mach_lightning.dist.coordinator import DistError
    from mach_lightning.run_lock import RunLockedError
    from mach_lightning.runs import DIVERGED, FINISHED_ALREADY
    from mach_lightning.training import Preempted, run_fit

    # A run's output is its progress, its run directory and its result: Lightning's info lines
    # (devices found, tips, checkpoint restores) are left to the library's own users.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_fit(cfg, trust_checkpoint=args.trust_checkpoint)
    except (ConfigError, DataError, CheckpointError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DistError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DIST
    except DiskFullError as err:
        print(f"error: {err.strerror}", file=sys.stderr)
        return EXIT_DISK_FULL
    except Preempted as stop:
        print(
            f"stopped by SIGTERM at step {stop.step}; last.ckpt is saved. Continue with "
            f"resume=true (run directory: {stop.run_dir})",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if result["status"] == FINISHED_ALREADY:
        print(
            f"run {result['run_dir']} has finished already (result.json): nothing to do, "
            f"nothing changed. Raise trainer.max_epochs or trainer.max_steps to train it further."
        )
        return 0
    print(_summary(result))
    if result["status"] == DIVERGED:
        print(f"error: the run diverged: {result['reason']}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
