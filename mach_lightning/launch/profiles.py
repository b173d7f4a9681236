"""Cluster profiles: the only cluster-specific settings, one YAML file per cluster in `slurm/`.

A profile says what to ask Slurm for (partition, account, qos, time, nodes, tasks and GPUs per node,
CPUs and memory per task, constraint, extra sbatch lines, environment setup lines) and which config
overrides every run on that cluster needs (e.g. where the data lives). `--cluster local` (the word,
not a file) is the built-in profile that runs jobs on this machine with submitit's LocalExecutor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mach_lightning.config.resources import PROFILES, data_dir, packaged
from mach_lightning.config.yamlfile import load_yaml

# The profiles shipped in the package (a checkout's package folder links to its slurm/).
PROFILE_DIR = data_dir(PROFILES).resolve()
EXECUTORS = ("slurm", "local")


class ProfileError(ValueError):
    """A cluster profile problem, naming the file, the key and the fix."""


@dataclass
class ClusterProfile:
    name: str = "cluster"  # shown in tables; defaults to the file's stem
    executor: str = "slurm"  # slurm | local (submitit's LocalExecutor, this machine)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 60  # wall-clock limit per job (requeued jobs get it again)
    nodes: int = 1
    tasks_per_node: int = 1  # one task per GPU: DDP ranks = nodes * tasks_per_node
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem_per_task_gb: float | None = None  # asks for tasks_per_node x this per node
    accelerator: str | None = None  # trainer.accelerator; default gpu with GPUs, else cpu
    signal_delay_s: int = 120  # USR2 this long before the time limit: checkpoint and requeue
    max_timeouts: int = 3  # requeues after hitting the time limit (preemptions do not count)
    array_parallelism: int = 64  # at most this many jobs of one sweep run at once
    parallel: int = 1  # local executor: jobs run at once on this machine
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch parameters (name: value)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (modules, venv)
    srun_args: list[str] = field(default_factory=list)  # extra srun arguments
    python: str | None = None  # python command on the nodes (default: this interpreter)
    config_overrides: list[str] = field(default_factory=list)  # key=value for every run here

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def trainer_overrides(self) -> list[str]:
        """Config overrides that make Lightning use exactly the allocation Slurm gives."""
        accelerator = self.accelerator or ("gpu" if self.gpus_per_node else "cpu")
        out = [f"trainer.accelerator={accelerator}", f"trainer.num_nodes={self.nodes}"]
        out.append(f"trainer.devices={self.tasks_per_node}")
        if self.world_size > 1:
            out.append("trainer.strategy=ddp")  # gloo on CPU, nccl on GPU
        return out

    def slurm_parameters(self, job_name: str) -> dict[str, Any]:
        """Parameters for submitit's SlurmExecutor.update_parameters (sbatch lines)."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time_min,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
            "additional_parameters": {"requeue": True, **self.sbatch},
        }
        optional = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "gpus_per_node": self.gpus_per_node or None,
            "cpus_per_task": self.cpus_per_task,
            "setup": list(self.setup) or None,
            "srun_args": list(self.srun_args) or None,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.mem_per_task_gb:
            params["mem"] = _mem(self.mem_per_task_gb * self.tasks_per_node)
        return params


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


LOCAL = ClusterProfile(name="local", executor="local")


def _profile_files() -> dict[str, Path]:
    """The profiles in slurm/ by name (in a checkout: the repository's slurm/, users' own too)."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}


def available_profiles() -> list[str]:
    return ["local", *_profile_files()]


def _resolve(spec: str | Path) -> Path:
    """A profile path as given, else slurm/NAME.yaml in the package, else a profile's name."""
    path = Path(spec)
    candidates = [
        path,
        packaged(PROFILES, path, bare=not Path(PROFILES).is_dir()),
        _profile_files().get(str(spec)),
    ]
    return next((c for c in candidates if c is not None and c.is_file()), path)


def _not_found(spec: str | Path) -> ProfileError:
    """Suggest the nearest profile in the form it was asked for: a name, or a path in slurm/."""
    as_path = "/" in str(spec) or str(spec).endswith((".yaml", ".yml"))
    # slurm/NAME.yaml: _resolve finds such paths from any working directory.
    files = {stem: f"{PROFILES}/{p.name}" for stem, p in _profile_files().items()}
    names = list(files) if as_path else available_profiles()
    close = difflib.get_close_matches(Path(spec).stem if as_path else str(spec), names, n=1)
    hint = f" Did you mean {files[close[0]] if as_path else close[0]}?" if close else ""
    example = next((n for n in files if n != "local"), "NAME")
    return ProfileError(
        f"Cluster profile '{spec}' not found.{hint} Available profiles: "
        f"{', '.join(files.values())} (or by name, e.g. --cluster {example}), and `local`: "
        "this machine without Slurm."
    )


def load_profile(spec: str | Path) -> ClusterProfile:
    """`local`, a profile name in slurm/ (e.g. `example-4x8gpu`) or a path to a profile YAML."""
    if str(spec) == "local":
        return ClusterProfile(**vars(LOCAL))
    path = _resolve(spec)
    if not path.is_file():
        raise _not_found(spec)
    return _parse(path)


def _parse(path: Path) -> ClusterProfile:
    schema = OmegaConf.structured(ClusterProfile(name=path.stem))
    raw = load_yaml(path, ProfileError, "Cluster profile")
    if not isinstance(raw, DictConfig):
        raise ProfileError(
            f"Cluster profile '{path}' must hold a mapping of settings (partition: gpu, "
            "nodes: 1, ...), not a list."
        )
    try:
        merged = OmegaConf.merge(schema, raw)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        known = ", ".join(sorted(ClusterProfile.__dataclass_fields__))
        raise ProfileError(
            f"Cluster profile {path}: bad key or value '{key}': {str(err).splitlines()[0]}. "
            f"Known keys: {known}."
        ) from None
    profile = ClusterProfile(**OmegaConf.to_container(merged))
    check_profile(profile, str(path))
    return profile


def check_profile(p: ClusterProfile, source: str) -> None:
    """Semantic checks: each names the key and the fix."""
    if p.executor not in EXECUTORS:
        raise ProfileError(f"{source}: executor={p.executor}; valid: {', '.join(EXECUTORS)}.")
    for key in ("nodes", "tasks_per_node", "time_min", "parallel", "array_parallelism"):
        if getattr(p, key) < 1:
            raise ProfileError(f"{source}: {key} must be at least 1, got {getattr(p, key)}.")
    if p.gpus_per_node < 0:
        raise ProfileError(f"{source}: gpus_per_node must be 0 or more.")
    if (
        p.gpus_per_node
        and p.tasks_per_node != p.gpus_per_node
        and (p.accelerator or "gpu") == "gpu"
    ):
        raise ProfileError(
            f"{source}: tasks_per_node={p.tasks_per_node} but gpus_per_node={p.gpus_per_node}: "
            "Lightning's DDP on Slurm runs one task per GPU, so set them equal."
        )
    if p.executor == "local" and (p.nodes, p.tasks_per_node) != (1, 1):
        raise ProfileError(
            f"{source}: the local executor runs one process per job on this "
            "machine: set nodes=1 and tasks_per_node=1."
        )
    if p.signal_delay_s >= p.time_min * 60:
        raise ProfileError(
            f"{source}: signal_delay_s={p.signal_delay_s} is not shorter than time_min="
            f"{p.time_min} minutes: the job would be signalled as it starts."
        )
    for line in p.config_overrides:
        if "=" not in line:
            raise ProfileError(f"{source}: config_overrides entry '{line}' is not key=value.")


def warnings(p: ClusterProfile) -> list[str]:
    """Legal but surprising settings."""
    out = []
    if p.executor == "slurm" and p.time_min <= 10:
        out.append(
            f"time_min={p.time_min}: submitit counts every signal to a job of 10 minutes "
            f"or less as a timeout, so it requeues such a job at most max_timeouts="
            f"{p.max_timeouts} times."
        )
    return out
