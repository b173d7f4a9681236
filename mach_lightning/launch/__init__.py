"""Launching runs and sweeps on Slurm (or this machine) with submitit.

- `profiles`: cluster profiles (`slurm/*.yaml`): what to ask Slurm for, validated.
- `sweep`: a sweep file expanded into jobs (grid x random x seeds, plus sync baselines).
- `task`: `TrainTask`, the requeueable callable each job runs (`run_fit` with a fixed run dir).
- `submit`: validate every job, then submit them all as one job array (or run them locally).
- `preflight`: what the jobs need besides their config (data files, run root, resumed runs),
  checked before anything is submitted.
- `status`: each job's state from the run directories and `squeue` (no accounting needed).

The command line is `sweeps/launch.py`.
"""

from mach_lightning.launch.profiles import ClusterProfile, ProfileError, load_profile
from mach_lightning.launch.sweep import Job, SweepError, expand_sweep, single_job

__all__ = [
    "ClusterProfile",
    "Job",
    "ProfileError",
    "SweepError",
    "expand_sweep",
    "load_profile",
    "single_job",
]
