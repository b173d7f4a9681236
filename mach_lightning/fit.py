"""Train one run: `python -m mach_lightning.fit --config configs/sync.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from mach_lightning import runs
from mach_lightning.config import ConfigError, load_config
from mach_lightning.data import DataError, create_datamodule, list_datasets
from mach_lightning.topologies import create_topology, list_topologies

# Lightning suggests srun whenever Slurm is installed; runs launched outside Slurm are intended.
warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")


class LastCheckpoint(Checkpoint):
    """Keep last.ckpt the run's latest state: after every validation, at the end of training and,
    with every_n_steps > 0, every N batch steps. Saved from every rank (a collective save, safe
    under DDP). A `Checkpoint` subclass, so Lightning runs it after ModelCheckpoint and the file
    holds the best-checkpoint tracking of that same moment. (ModelCheckpoint's own save_last only
    writes when a new best is saved, so its last.ckpt can lag behind the run.)"""

    def __init__(self, path: Path, every_n_steps: int = 0):
        self.path, self.every_n_steps = path, every_n_steps

    def save_last(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:  # metrics.csv holds every row up to the checkpoint's step
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.count_batch()  # callbacks run before the module's own on_train_batch_end
        if self.every_n_steps > 0 and pl_module.batch_step % self.every_n_steps == 0:
            self.save_last(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.save_last(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save_last(trainer)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn by the clock: at most every `interval_s` seconds during
    training (and at each epoch's last batch) instead of every N batches. Lightning's bar redraws
    twice per update, which at hundreds of small batches a second is a visible share of a step
    and more updates than anyone can read."""

    def __init__(self, interval_s: float = 0.25):
        super().__init__(refresh_rate=10)  # validation and test bars: every 10 batches
        self.interval_s, self._next_redraw = interval_s, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar, now = self.train_progress_bar, time.monotonic()
        if now < self._next_redraw and batch_idx + 1 != bar.total:
            return
        self._next_redraw = now + self.interval_s
        bar.n = batch_idx + 1
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # one redraw, with the new count


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="best-epoch{epoch:03d}",
            auto_insert_metric_name=False,
            monitor=cfg.run.monitor,
            mode=cfg.run.monitor_mode,
            save_top_k=1,
            save_last=False,  # LastCheckpoint writes last.ckpt
            enable_version_counter=False,
        ),
        LastCheckpoint(ckpt_dir / "last.ckpt", cfg.run.checkpoint_every_n_steps),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(ProgressBar())
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    loggers = [runs.RunCSVLogger(run_dir)]
    if cfg.logger.wandb.enabled:
        loggers.append(runs.make_wandb_logger(cfg, run_dir))
    t = cfg.trainer
    # Under Slurm, submitit owns preemption signals (it requeues the job; the job resumes from
    # last.ckpt). Lightning's own SIGUSR1 requeue handler would be a second owner.
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    return Trainer(
        plugins=plugins,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=build_callbacks(cfg, run_dir),
        max_epochs=t.max_epochs if t.max_epochs > 0 else -1,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches),
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )


def _limit(value: float):
    """Lightning reads 0.5 as 'half' and 10 as '10 batches'; None (all) keeps its log quiet."""
    if value == 1.0:
        return None
    return int(value) if value > 1 else value


def _resume_step(ckpt_path: str) -> int:
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return int(state.get("topology_state", {}).get("batch_step", 0))


def peak_memory_mb() -> float:
    """Peak device memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _test(trainer: Trainer, model, datamodule) -> dict[str, float]:
    """Test the final weights (test/...) and the best checkpoint if any (test_best/...)."""
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        model.test_label = "test_best"  # loads the best weights; training is over
        trainer.test(
            model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=False
        )
        metrics.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_best/")}
        )
    return metrics


def run_fit(cfg: DictConfig) -> dict:
    """Train, validate and test one run; returns {'run_dir': str, 'metrics': {...}}."""
    seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.prepare_data()  # missing or corrupt data fails here, before any run directory exists
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    run_dir, ckpt_path = runs.resolve_run(cfg)
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        runs.save_resolved_config(cfg, run_dir)
        if ckpt_path:
            runs.truncate_metrics(run_dir, _resume_step(ckpt_path))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    metrics["step"] = float(model.batch_step)
    if cfg.trainer.test_after_fit:
        metrics.update(_test(trainer, model, datamodule))
    metrics["mem/peak_mb"] = peak_memory_mb()
    if trainer.is_global_zero:
        runs.write_result(run_dir, metrics)
    return {"run_dir": str(run_dir), "metrics": metrics}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mach_lightning.fit",
        description="Train one run. Settings: configs/default.yaml; override with key=value.",
    )
    parser.add_argument("--config", help="experiment file layered over configs/default.yaml")
    parser.add_argument("--list", action="store_true", help="list topologies and datasets")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. seed=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("topologies:", ", ".join(list_topologies()))
        print("datasets:  ", ", ".join(list_datasets()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        result = run_fit(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result["metrics"].items()) if "acc" in k)
    print(f"run directory: {result['run_dir']}\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
