"""Resuming a run safely: check the checkpoint against the config before anything is written.

A resume (`resume=true`, or `ckpt_path=`) first loads the checkpoint and compares the config it was
trained with against the one given now. Nothing is written into the run directory before this
passes, so a wrong checkpoint or a changed setting cannot damage a finished run:

- settings that only say where things are or how they are shown (IGNORED) may differ freely;
- settings that change what is left to do, not what was done (APPLIED: the training budget,
  validation and checkpoint cadence, the test at the end) are applied and recorded in
  events.jsonl, so config.yaml is always the config the run uses;
- any other difference (the model, the topology, the optimizer, the data, the seed...) is refused
  with the differing keys, since the checkpoint's weights, optimizer state and data order belong
  to the old values.

A finished run (result.json) whose budget is not raised is left untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mach_lightning.config import ConfigError, migrate_legacy_keys

IGNORED = (
    "resume",
    "ckpt_path",
    "run.root",
    "run.id",
    "run.slurm_job_id",
    "logger.",
    "trainer.progress_bar",
    "trainer.lean_steps",  # bit-identical either way (tests/test_topologies.py)
    "data.root",
    "data.download",
    "data.verify",
    "runtime.sleep_ms",  # dist: how fast a process runs, not what it computes
    "runtime.timeout_s",
    "runtime.host",
    "runtime.port",
)
APPLIED = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.test_after_fit",
    "trainer.limit_val_batches",
    "trainer.check_val_every_n_epoch",
    "trainer.divergence_factor",
    "run.checkpoint_every_n_steps",
    "data.eval_batch_size",
)
BUDGET = ("trainer.max_epochs", "trainer.max_steps")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


@dataclass
class ResumePlan:
    ckpt_path: str | None = None
    checkpoint: dict = field(default_factory=dict)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key: (was, now)
    finished: dict | None = None  # the run's result.json when there is nothing left to do

    @property
    def step(self) -> int:
        return int(self.checkpoint.get("topology_state", {}).get("batch_step", 0))

    @property
    def csv_rows(self) -> int | None:
        """metrics.csv's row count when this checkpoint was saved, if LastCheckpoint saved it."""
        record = self.checkpoint.get("callbacks", {}).get("LastCheckpoint", {})
        return record.get("csv_rows") if record.get("at_step") == self.step else None

    @property
    def extends_budget(self) -> bool:
        return any(key in self.changes for key in BUDGET)


def config_changes(cfg: DictConfig, saved: dict, source: str) -> dict[str, tuple[Any, Any]]:
    """The APPLIED settings that differ from the checkpoint's; any other difference is an error.
    A key the checkpoint lacks (written by an older version) is taken as unchanged; the old flat
    topology keys are read as the section keys they became (config/legacy.py)."""
    now = _flatten(OmegaConf.to_container(cfg, resolve=True))
    was = _flatten(migrate_legacy_keys(saved))
    differing = {
        k: (was[k], now.get(k))
        for k in sorted(was.keys() & now.keys())
        if was[k] != now[k] and not _matches(k, IGNORED)
    }
    refused = {k: v for k, v in differing.items() if not _matches(k, APPLIED)}
    if refused:
        lines = "; ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in refused.items()
        )
        raise ConfigError(
            f"{source} was trained with other settings ({lines}). Resume with the checkpoint's "
            f"values (drop those overrides), or start a new run (another run.id, without "
            f"resume=true or ckpt_path). Nothing was written."
        )
    return differing


def read_result(run_dir: Path) -> dict | None:
    """result.json as a dict; None when absent or unreadable (then the run is not finished)."""
    path = Path(run_dir) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def plan_resume(
    cfg: DictConfig, run_dir: Path, ckpt_path: str | None, trust: bool = False
) -> ResumePlan:
    """Load and check the checkpoint to resume from; say whether anything is left to do."""
    if ckpt_path is None:
        return ResumePlan()
    from mach_lightning.checkpoint_io import load_checkpoint

    checkpoint = load_checkpoint(ckpt_path, trust=trust)
    saved = checkpoint.get("hyper_parameters", {}).get("config")
    if not isinstance(saved, dict) or "topology_state" not in checkpoint:
        raise ConfigError(
            f"{ckpt_path} is not a mach_lightning training checkpoint (it has no saved config "
            f"or topology state). Give a checkpoints/last.ckpt or best-*.ckpt of a run."
        )
    plan = ResumePlan(ckpt_path, checkpoint, config_changes(cfg, saved, f"Checkpoint {ckpt_path}"))
    result = read_result(run_dir)
    if result is not None and not plan.extends_budget:
        plan.finished = result
    return plan


def check_weights_fit(model, plan: ResumePlan) -> None:
    """Load the checkpoint's weights into the model now, so a mismatch is an error before any
    file is written (Lightning loads them again when fitting)."""
    if not plan.ckpt_path:
        return
    from mach_lightning.sim.step import StateFormatError, check_state_format

    try:
        check_state_format(plan.checkpoint.get("topology_state", {}))
    except StateFormatError as err:
        raise ConfigError(f"Checkpoint {plan.ckpt_path}: {err}") from None
    try:
        model.load_state_dict(plan.checkpoint["state_dict"], strict=True)
    except (RuntimeError, KeyError) as err:
        detail = str(err).strip().splitlines()
        raise ConfigError(
            f"Checkpoint {plan.ckpt_path} does not fit this model: "
            f"{' '.join(detail[:3])[:600]}. Use the settings it was trained with."
        ) from None
