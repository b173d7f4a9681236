"""Launch runs and sweeps on Slurm (or this machine) with submitit.

  mach-launch --config configs/sync.yaml --cluster slurm/local.yaml [key=value ...]
  mach-launch --sweep sweeps/staleness.yaml --cluster slurm/<profile>.yaml [key=value ...]
  mach-launch --sweep sweeps/staleness.yaml --cluster slurm/<profile>.yaml --dry-run
  mach-launch --sweep sweeps/staleness.yaml --cluster local     # no Slurm: this machine
  mach-launch --status staleness          # or a sweep file, or a run directory

`python sweeps/launch.py` in a checkout is the same command. Re-running a sweep skips finished and
still-queued runs and resubmits failed or missing ones, which continue from their last.ckpt.
key=value overrides apply to every job of a sweep.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mach_lightning.config import locate_config
from mach_lightning.config.schema import RunConfig
from mach_lightning.launch import profiles, status, submit
from mach_lightning.launch.sweep import SweepError, expand_sweep, single_job
from mach_lightning.launch.sweep_spec import SWEEP_DIR


def parse_args(argv, prog=None):
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="one run of this experiment file")
    what.add_argument("--sweep", help="a sweep file (sweeps/*.yaml)")
    what.add_argument("--status", metavar="SWEEP", help="state of a sweep's jobs (name or file)")
    p.add_argument(
        "--cluster",
        default=None,
        help="cluster profile: slurm/<name>.yaml, a name in slurm/, or `local` "
        "(submitit's local executor, no Slurm)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print jobs and sbatch file; submit nothing"
    )
    p.add_argument("--wait", action="store_true", help="wait until every job has ended")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every job")
    # Intermixed: key=value may come before, between or after the options (seed=1 --config X).
    return p.parse_intermixed_args(argv)


def sweep_path(spec: str) -> Path:
    path = Path(spec)
    if not path.is_file() and (SWEEP_DIR / f"{spec}.yaml").is_file():
        path = SWEEP_DIR / f"{spec}.yaml"
    return path


def build_jobs(args, profile):
    pre = list(profile.config_overrides)
    if args.config:
        # The job runs the file by absolute path: find a packaged configs/NAME.yaml here first.
        config = str(locate_config(args.config))
        return "run", [single_job(config, args.overrides, pre)]
    spec, jobs = expand_sweep(sweep_path(args.sweep), args.overrides, pre)
    return spec["name"], jobs


def print_dry_run(jobs, profile, label) -> None:
    rows = [[j.key, j.topology, "baseline" if j.baseline else "", str(j.run_dir)] for j in jobs]
    print(f"{label}: {len(jobs)} job(s) on cluster '{profile.name}' ({profile.executor})")
    print(status.format_table(["job", "topology", "", "run directory"], rows))
    first = jobs[0]
    config = f"--config {first.config} " if first.config else ""
    print(f"\njob 1 runs: python -m mach_lightning.fit {config}{' '.join(first.overrides)}")
    if profile.executor == "slurm":
        folder = first.run_dir.parent / ".submitit"
        kind = f"one job array of {len(jobs)}" if len(jobs) > 1 else "one job"
        print(f"\nsbatch file ({kind}):")
        print(submit.sbatch_script(profile, folder, label, len(jobs)))
    print("dry run: nothing submitted")


def print_submitted(planned, sjobs) -> None:
    ids = iter(sjobs)
    rows = []
    for job, action in planned:
        job_id = next(ids).job_id if action.startswith("submit") else "-"
        rows.append([job.key, action, job_id, str(job.run_dir)])
    print(status.format_table(["job", "action", "job id", "run directory"], rows))
    for job, action in planned:
        if action.startswith("submit") and len(planned) == 1:
            sub = status.last_submission(job.run_dir)
            print(
                f"job id: {sub['job_id']}\nrun directory: {job.run_dir}\n"
                f"log: {sub['stdout'][0]}  (linked from {job.run_dir / 'logs'})"
            )


def wait_and_report(entries) -> int:
    while True:
        rows = status.status_rows(entries)
        if not any(r.active for r in rows):
            break
        time.sleep(2)
    print(status.format_status(rows))
    return 0 if all(r.state == "FINISHED" for r in rows) else 1


def run_dir_entries(spec: str, run_root: str | Path) -> list[tuple[str, Path]]:
    """(key, run directory) for what `python -m mach_lightning.report SPEC` reads besides sweep
    files: a run directory, a folder of them, or a sweep name meaning <run_root>/<name>/."""
    folder = Path(spec) if Path(spec).is_dir() else Path(run_root) / spec
    found = status.run_dirs_under(folder) if folder.is_dir() else []
    dirs = list(dict.fromkeys(d.resolve() for d in found))
    if not dirs:
        raise SweepError(
            f"--status {spec}: no sweep file sweeps/{spec}.yaml, and no run directories at "
            f"{spec} or under {Path(run_root) / spec}. Give a sweep file, a sweep name, a run "
            f"directory or a folder of them (run.root=DIR if the runs are not under {run_root})."
        )
    return [(d.name, d) for d in dirs]


def show_status(args) -> int:
    spec = args.status
    if sweep_path(spec).is_file() or spec.endswith((".yaml", ".yml")):  # also jobs not submitted
        args.sweep, args.config = spec, None
        profile = profiles.load_profile(args.cluster or "local")
        label, jobs = build_jobs(args, profile)
        entries = [(j.key, j.run_dir) for j in submit.prepare(jobs, profile, label, check=False)]
    else:  # a sweep name, a run directory or a folder of them: as the report takes them
        roots = [o.split("=", 1)[1] for o in args.overrides if o.startswith("run.root=")]
        entries = run_dir_entries(spec, roots[-1] if roots else RunConfig.root)
    print(status.format_status(status.status_rows(entries)))
    return 0


def main(argv=None, prog=None) -> int:
    """The launcher's exit code: 0 done (or all jobs finished with --wait), 1 a job failed, 2 a
    usage error. `prog` names the command in --help (default: how it was started)."""
    args = parse_args(argv, prog)
    try:
        if args.status:
            return show_status(args)
        if not args.cluster:
            raise profiles.ProfileError(
                "say where to run: --cluster slurm/<profile>.yaml (see slurm/), or --cluster "
                "local for this machine without Slurm."
            )
        profile = profiles.load_profile(args.cluster)
        label, jobs = build_jobs(args, profile)
        jobs = submit.prepare(jobs, profile, label)
        label = label if args.sweep else jobs[0].run_dir.parent.name  # a run: the config's name
    except (SweepError, profiles.ProfileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in profiles.warnings(profile):
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print_dry_run(jobs, profile, label)
        return 0
    planned = submit.plan(jobs)
    todo = [job for job, action in planned if action.startswith("submit")]
    sjobs = submit.submit(todo, profile, label)
    print_submitted(planned, sjobs)
    if args.wait or profile.executor == "local":
        return wait_and_report([(j.key, j.run_dir) for j in jobs])
    return 0


if __name__ == "__main__":
    sys.exit(main())
