"""Run directories: where a run lives, how it is resumed, and what it writes.

<run.root>/<name>/<id>/
  config.yaml        the fully resolved config
  metrics.csv        every logged metric, one row per log call, against `step`
  checkpoints/       last.ckpt (always) and best-*.ckpt (by run.monitor)
  wandb/             the W&B run (offline: `wandb sync <run>/wandb/offline-run-*` later)
  result.json        final metrics and `status` (finished | diverged), written when the run ends
  events.jsonl       what happened to the run: starts, resumes, applied config changes, requeues
  .lock              held by the process running in the directory (run_lock.py)

Every file is replaced atomically (atomic.py): a crash never leaves a half-written one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import threading
import time
from argparse import Namespace
from datetime import datetime
from pathlib import Path

from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mach_lightning.atomic import atomic_write_text
from mach_lightning.config import ConfigError

METRICS_FILE, HPARAMS_FILE = "metrics.csv", "hparams.yaml"
RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"  # launch/task.py reads it as EVENTS
FINISHED, DIVERGED, FINISHED_ALREADY = "finished", "diverged", "finished already"


def run_parent(cfg: DictConfig) -> Path:
    return Path(cfg.run.root) / cfg.name


def _resume_marker(run_dir: Path) -> Path | None:
    """What makes a run resumable: its last.ckpt, or (a dist run) a component's checkpoint."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    return max(
        run_dir.glob("components/c*/ckpt/s*.pt"), key=lambda p: p.stat().st_mtime, default=None
    )


def _latest_resumable(parent: Path) -> Path | None:
    marked = [(p, _resume_marker(p)) for p in parent.glob("*")]
    found = [(p, m) for p, m in marked if m is not None]
    return max(found, key=lambda pm: pm[1].stat().st_mtime, default=(None, None))[0]


def resolve_run(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run directory and the checkpoint to resume from (None: start fresh)."""
    if cfg.ckpt_path:
        ckpt = Path(cfg.ckpt_path)
        if not ckpt.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist; give a .ckpt file path.")
        inside_run = (
            ckpt.parent.name == "checkpoints" and (ckpt.parent.parent / "config.yaml").exists()
        )
        run_dir = ckpt.parent.parent if inside_run else run_parent(cfg) / _new_id(cfg)
        return run_dir, str(ckpt)
    if cfg.run.id:
        run_dir = run_parent(cfg) / cfg.run.id
        last, marker = run_dir / "checkpoints" / "last.ckpt", _resume_marker(run_dir)
        if marker is not None and not cfg.resume:
            held = marker.relative_to(run_dir)
            raise ConfigError(
                f"Run directory {run_dir} already holds a run ({held}). Continue it "
                f"with resume=true, or start a new one under another run.id. Nothing was written."
            )
        # A fixed id with resume=true and no checkpoint yet is a first start (e.g. a new Slurm job).
        return run_dir, str(last) if cfg.resume and last.is_file() else None
    if cfg.resume:
        found = _latest_resumable(run_parent(cfg))
        if found is None:
            raise ConfigError(
                f"resume=true, but no run under {run_parent(cfg)} has checkpoints/last.ckpt "
                "(or, run with runtime.name=dist, components/c*/ckpt/). Start without "
                "resume=true, or point ckpt_path= at a checkpoint."
            )
        last = found / "checkpoints" / "last.ckpt"
        return found, str(last) if last.is_file() else None  # None: a dist run's own
    return run_parent(cfg) / _new_id(cfg), None


def _new_id(cfg: DictConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = stamp, 1
    while (run_parent(cfg) / candidate).exists():  # two runs started in the same second
        candidate, n = f"{stamp}-{n}", n + 1
    return candidate


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_result(run_dir: Path, metrics: dict, status: str = FINISHED, reason: str = "") -> None:
    """result.json: the final metrics (floats), the run's `status` and, if it diverged, why."""
    record: dict = {k: float(v) for k, v in metrics.items()}
    record["status"] = status
    if reason:
        record["reason"] = reason
    atomic_write_text(run_dir / RESULT_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def log_run_event(run_dir: Path, event: str, **fields) -> None:
    """Append one line to <run_dir>/events.jsonl (a small append stays whole)."""
    record = {"event": event, "time": time.time(), "host": socket.gethostname(), **fields}
    # one writer for fit's and the launcher's events (launch/task.py adds each line's rank)
    with open(Path(run_dir) / EVENTS_FILE, "a") as file:
        file.write(json.dumps(record, default=str) + "\n")


def prepare_run_dir(cfg: DictConfig, run_dir: Path, plan) -> None:
    """The run's first writes, once its checkpoint and config have been checked (resume.py):
    config.yaml, metrics.csv cut back to the checkpoint's step, the applied changes recorded.
    A finished run trained further keeps its earlier result as result-step<N>.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.ckpt_path and (run_dir / RESULT_FILE).is_file():
        os.replace(run_dir / RESULT_FILE, run_dir / f"result-step{plan.step}.json")
    save_resolved_config(cfg, run_dir)
    # a first start (no checkpoint) also drops the rows of an attempt that saved none
    truncate_metrics(run_dir, plan.step, plan.csv_rows)
    for key, (was, now) in plan.changes.items():
        log_run_event(run_dir, "config_change", key=key, was=was, now=now, step=plan.step)
    if plan.ckpt_path:
        log_run_event(run_dir, "resume", step=plan.step, ckpt=plan.ckpt_path)


class RunCSVLogger(Logger):
    """Writes <run_dir>/metrics.csv (and hparams.yaml) itself, appending across resumes.

    The file is byte for byte what Lightning's CSVLogger writes: sorted columns, `step` among them,
    one row per log call, blank where a row lacks a column; a new column rewrites the file under
    the new header. Unlike Lightning's, an existing file is kept and appended to, under its header.

    Rows reach the file at the first log call, then at most every `flush_every_s` seconds, at every
    `save` (Lightning calls it after each of its own log calls; fit.LastCheckpoint before
    last.ckpt) and when the run ends or fails (Lightning finalizes its loggers). A resume truncates
    the file to the checkpoint's step, so even a hard kill loses no row that the resumed run keeps.
    Rank zero only, like Lightning's: the other ranks log nothing.
    """

    def __init__(self, run_dir: Path, flush_every_s: float = 2.0):
        super().__init__()
        self._dir = str(run_dir)
        self.metrics_file = os.path.join(self._dir, METRICS_FILE)
        self.flush_every_s, self._next_flush = flush_every_s, 0.0
        self._rows: list[dict] = []  # logged, not yet in the file
        self._keys: list[str] | None = None  # the file's columns; None: not used yet
        self._hparams: dict = {}

    @property
    def name(self) -> str:
        return ""  # the run directory is the log directory: no <name>/<version> below it

    @property
    def version(self) -> str:
        return ""  # also what the progress bar shows as v_num, as with Lightning's

    @property
    def save_dir(self) -> str:
        return self._dir

    @property
    def log_dir(self) -> str:
        return self._dir

    def _start(self) -> None:
        """At first use, as Lightning's writer: the directory made, an existing header read."""
        if self._keys is None:
            os.makedirs(self._dir, exist_ok=True)
            self._keys = []
            if os.path.isfile(self.metrics_file):  # a resumed run: its columns carry on
                with open(self.metrics_file, newline="") as file:
                    self._keys = list(csv.DictReader(file).fieldnames or [])

    @rank_zero_only
    def log_hyperparams(self, params: dict | Namespace | None = None) -> None:
        self._start()
        self._hparams.update(vars(params) if isinstance(params, Namespace) else params or {})
        save_hparams_to_yaml(os.path.join(self._dir, HPARAMS_FILE), self._hparams)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._start()
        row = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        row["step"] = len(self._rows) if step is None else step  # Lightning's default, too
        self._rows.append(row)
        now = time.monotonic()
        if now >= self._next_flush:
            self._next_flush = now + self.flush_every_s
            self.save()

    @rank_zero_only
    def save(self) -> None:
        self._start()
        if not self._rows:
            return
        new_keys = set().union(*self._rows) - set(self._keys)
        self._keys.extend(new_keys)
        self._keys.sort()  # Lightning sorts the columns at every save
        if new_keys or not os.path.isfile(self.metrics_file):
            self._rewrite()
        else:
            with open(self.metrics_file, "a", newline="") as file:
                csv.DictWriter(file, fieldnames=self._keys).writerows(self._rows)
        self._rows = []

    def _rewrite(self) -> None:
        """The whole file under the current header: earlier rows (if any), then the pending ones.

        Replaced atomically, so a kill mid-rewrite keeps the earlier rows (Lightning rewrites in
        place); the bytes are the same as its rewrite followed by its append."""
        rows = []
        if os.path.isfile(self.metrics_file):
            with open(self.metrics_file, newline="") as file:
                rows = list(csv.DictReader(file))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self._keys)
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows(self._rows)
        atomic_write_text(self.metrics_file, text.getvalue())

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._keys is not None:  # never used (e.g. not rank zero): nothing to write
            self.save()


def csv_rows(run_dir: Path) -> int:
    """Data rows in <run_dir>/metrics.csv (a row never spans lines: every value is a number)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as file:
        return max(sum(1 for _ in file) - 1, 0)


def truncate_metrics(run_dir: Path, after_step: int, keep_rows: int | None = None) -> None:
    """Drop rows logged after the resumed checkpoint, so a resumed run's CSV has no repeats.

    `keep_rows`, the file's row count when the checkpoint was saved (LastCheckpoint records
    it), is exact; without it, rows are kept up to the checkpoint's step, which also keeps rows
    logged at that same step after the save (e.g. the next epoch's learning rates)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields, rows = reader.fieldnames or [], list(reader)
    if keep_rows is not None:
        kept = rows[:keep_rows]
    else:
        kept = [r for r in rows if not r.get("step") or float(r["step"]) <= after_step]
    if len(kept) == len(rows):
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_text(path, text.getvalue())


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """True if a TCP connection opens within `timeout`; DNS runs in a thread so it cannot hang."""
    result: list[bool] = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def wandb_mode(wandb_cfg) -> str:
    """online or offline. WANDB_MODE wins; `auto` is offline without an API key or network."""
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    if wandb_cfg.mode != "auto":
        return wandb_cfg.mode
    return "online" if _has_wandb_key() and _reachable("api.wandb.ai") else "offline"


def wandb_run_id(name: str, run_dir: Path) -> str:
    """The W&B run id of a run: fixed by its directory, so resumes and reports find the same run."""
    return f"{name}-{Path(run_dir).name}".replace("/", "-")[:128]


def make_wandb_logger(cfg: DictConfig, run_dir: Path):
    """A WandbLogger whose run id is fixed by the run directory: resumes continue the same run."""
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(cfg.logger.wandb)
    os.environ["WANDB_MODE"] = mode  # also stops wandb from prompting for a key
    if mode == "offline":  # wandb's own banner is a dozen lines; one line says what matters
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        wandb.setup()  # reads WANDB_SILENT now: also before the run's settings are checked
        print(f"W&B: offline run under {run_dir / 'wandb'} (upload later with `wandb sync`)")
    run_id = wandb_run_id(cfg.name, run_dir)
    w = cfg.logger.wandb
    if cfg.runtime.name == "dist":  # one panel section per component process (panels.py)
        from mach_lightning.panels import ComponentPanelsWandbLogger as WandbLogger
    return WandbLogger(
        name=f"{cfg.name}/{run_dir.name}",
        id=run_id,
        save_dir=str(run_dir),
        project=w.project,
        entity=w.entity,
        group=w.group,
        job_type=w.job_type,
        tags=list(w.tags),
        offline=mode == "offline",
        resume="allow",
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def make_tensorboard_logger(run_dir: Path):
    """TensorBoard event files in <run_dir>/tensorboard/ (`tensorboard --logdir runs/`)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    try:
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard")
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"logger.tensorboard.enabled=true needs the tensorboard package ({err}): "
            f"pip install tensorboard (or mach_lightning[tensorboard])."
        ) from None
