"""One run assembled and trained: config -> data -> topology -> Trainer -> result.json.

`python -m mach_lightning.fit` (fit.py) is the command line over `run_fit`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

# Importing the methods registers them and their config sections, which load_config composes.
import mach_lightning.methods  # noqa: F401
from mach_lightning import runs
from mach_lightning.atomic import AtomicCheckpointIO
from mach_lightning.callbacks import LastCheckpoint, ProgressBar
from mach_lightning.checkpoint_io import lightning_loading
from mach_lightning.config import ConfigError
from mach_lightning.data import create_datamodule
from mach_lightning.resume import check_weights_fit, config_changes, plan_resume, read_result
from mach_lightning.run_lock import RunLock
from mach_lightning.runs import DIVERGED, FINISHED, FINISHED_ALREADY
from mach_lightning.sim import create_topology

EXIT_PREEMPTED = 143  # 128 + SIGTERM, Slurm's convention

# Lightning suggests srun whenever Slurm is installed; runs launched outside Slurm are intended.
warnings.filterwarnings("ignore", message=r".*`srun` command is available on your system.*")
warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
# Training metrics are logged by the topology, at least once an epoch (TopologyModule).
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


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
        # lr-<Optimizer>[-i]: optimizer i's learning rate (components first, then any
        # synthesizers), logged at each epoch start: schedulers step once per epoch.
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(ProgressBar())
    return callbacks


def build_trainer(cfg: DictConfig, run_dir: Path) -> Trainer:
    loggers = [runs.RunCSVLogger(run_dir)]
    if cfg.logger.wandb.enabled:
        loggers.append(runs.make_wandb_logger(cfg, run_dir))
    if cfg.logger.tensorboard.enabled:
        loggers.append(runs.make_tensorboard_logger(run_dir))
    t = cfg.trainer
    # Under Slurm, submitit owns preemption signals (it requeues the job; the job resumes from
    # last.ckpt). Lightning's own SIGUSR1 requeue handler would be a second owner.
    plugins: list = [AtomicCheckpointIO()]  # a kill or a full disk mid-save keeps the last one
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
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


def peak_memory_mb() -> float:
    """Peak device memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _test(trainer: Trainer, model, datamodule, trust: bool) -> dict[str, float]:
    """Test the final weights (test/...) and the best checkpoint if any (test_best/...)."""
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        model.test_label = "test_best"  # loads the best weights; training is over
        trainer.test(
            model, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=not trust
        )
        metrics.update(
            {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_best/")}
        )
    return metrics


def run_fit(cfg: DictConfig, trust_checkpoint: bool = False) -> dict:
    """Train, validate and test one run; returns {'run_dir', 'status', 'metrics'}.

    Everything that can fail without training (data, checkpoint, config against the
    checkpoint's, the weights' shapes, the run directory's lock) is checked before the first
    write into the run directory, so a failing command never damages an existing run.
    """
    seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = create_datamodule(cfg.data, cfg.seed)
    datamodule.prepare_data()  # missing or corrupt data fails here, before any run directory exists
    run_dir, ckpt_path = runs.resolve_run(cfg)
    plan = plan_resume(cfg, run_dir, ckpt_path, trust_checkpoint)
    if plan.finished is not None:
        return {"run_dir": str(run_dir), "status": FINISHED_ALREADY, "metrics": plan.finished}
    if cfg.runtime.name == "dist" and plan.ckpt_path:
        raise ConfigError(
            f"{plan.ckpt_path} is a simulated run's checkpoint: continue it with runtime.name=sim, "
            "or start a runtime.name=dist run under a new run.id."
        )
    model = create_topology(cfg, datamodule.input_shape, datamodule.num_classes)
    dist_resume = _dist_resume_step(cfg, run_dir, model.rule)
    finished = read_result(run_dir) if dist_resume is not None else None
    if finished is not None:
        return {"run_dir": str(run_dir), "status": FINISHED_ALREADY, "metrics": finished}
    check_weights_fit(model, plan)
    trainer = build_trainer(cfg, run_dir)
    lock = RunLock(run_dir).acquire() if trainer.is_global_zero else None
    try:
        if trainer.is_global_zero:
            runs.prepare_run_dir(cfg, run_dir, plan)
        if cfg.runtime.name == "dist":
            return _dist_train_and_test(cfg, trainer, model, datamodule, run_dir, dist_resume)
        return _train_and_test(cfg, trainer, model, datamodule, run_dir, plan, trust_checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _train_and_test(cfg, trainer, model, datamodule, run_dir, plan, trust: bool) -> dict:
    try:
        with lightning_loading(trust):
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=plan.ckpt_path, weights_only=not trust
            )
    except SIGTERMException:
        raise Preempted(run_dir, model.batch_step) from None
    if model.batch_step == 0:
        raise ConfigError(
            "No training batch ran (check trainer.limit_train_batches and the data's size); "
            "no result.json was written."
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/" in k}
    metrics["step"] = float(model.batch_step)
    status = DIVERGED if model.diverged else FINISHED
    if cfg.trainer.test_after_fit and not model.diverged:
        with lightning_loading(trust):
            metrics.update(_test(trainer, model, datamodule, trust))
    metrics["mem/peak_mb"] = peak_memory_mb()
    if trainer.is_global_zero:
        runs.write_result(run_dir, metrics, status, reason=model.diverged)
    return {"run_dir": str(run_dir), "status": status, "metrics": metrics, "reason": model.diverged}


def _dist_resume_step(cfg, run_dir: Path, rule) -> int | None:
    """resume=true of a dist run: the step its component processes all saved (checked against
    the run's config.yaml first, as a checkpoint's config is); None: a fresh start."""
    if cfg.runtime.name != "dist" or not cfg.resume or not (run_dir / "config.yaml").is_file():
        return None
    from mach_lightning.dist.coordinator import resume_step

    step = resume_step(run_dir, rule)
    if step is not None:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        config_changes(cfg, saved, f"Run {run_dir}")
    return step


def _dist_train_and_test(cfg, trainer, model, datamodule, run_dir, resume=None) -> dict:
    """One process per component trains (dist/); this process then logs their merged rows and
    evaluates the merged weights exactly as a simulated run's are evaluated."""
    from mach_lightning.dist.coordinator import run_components

    if resume is not None:
        runs.log_run_event(run_dir, "resume", step=resume, runtime="dist")
    done = run_components(cfg, run_dir, model.rule, resume)
    for row in done.rows:
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    metrics = {k: v for row in done.rows for k, v in row.items() if "/" in k}  # the latest
    with lightning_loading(False):
        for epoch in done.epochs:  # val/* per epoch, as a simulated run logs them
            metrics.update(_validate_at(trainer, model, datamodule, epoch))
        if not done.epochs or done.epochs[-1]["step"] != done.steps:  # ended inside an epoch
            last = {"epoch": len(done.epochs), "step": done.steps, "state": done.state}
            metrics.update(_validate_at(trainer, model, datamodule, last))
        model.load_state_dict({**model.state_dict(), **done.state})
        if cfg.trainer.test_after_fit:  # no best checkpoint: test/ only
            metrics.update(_test(trainer, model, datamodule, trust=False))
    metrics.update({"step": float(done.steps), "time/dist_wall_s": done.seconds})
    metrics["mem/peak_mb"] = peak_memory_mb()
    for logger in trainer.loggers:
        logger.finalize("success")
    runs.write_result(run_dir, metrics, FINISHED)
    return {"run_dir": str(run_dir), "status": FINISHED, "metrics": metrics, "reason": ""}


def _validate_at(trainer, model, datamodule, epoch: dict) -> dict:
    """Validate the merged weights a dist run had at an epoch's end, logged at its step (with
    the wall time the slowest component process reached it at, time/dist_elapsed_s)."""
    model.load_state_dict({**model.state_dict(), **epoch["state"]})
    model.batch_step, model.eval_epoch = epoch["step"], epoch["epoch"]
    trainer.validate(model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if "elapsed_s" in epoch:
        for logger in trainer.loggers:
            logger.log_metrics({"time/dist_elapsed_s": epoch["elapsed_s"]}, step=epoch["step"])
    return metrics


class Preempted(SystemExit):
    """SIGTERM stopped training after last.ckpt was saved: exit 143, as Slurm's convention says,
    so no wrapper reads a preempted run as done."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.run_dir, self.step = run_dir, step
