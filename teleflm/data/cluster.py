"""A `teleflm data prepare` job on a Slurm cluster: a job array per stage (on the cluster's shared
file system), each array task one worker, and the job's progress over all its workers.

Each array task runs the command the local engine runs per process (teleflm.data.prepare's
`worker_command`): a worker runs its own tasks and skips those already recorded as done, so a failed
array task is rerun alone by resubmitting it, and resubmitting the whole job redoes only what is
missing.
"""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from teleflm.data.prepare import read_plan, stage_progress, worker_command


def describe_progress(out: str | Path) -> str:
    """`teleflm data progress`: one line per stage started so far."""
    job = Path(out) / ".job"
    plan = read_plan(job)
    lines = [f"{out}: {plan['engine']} job of {plan['jobs']} workers, stages {', '.join(plan['stages'])}"]
    for stage in plan["stages"]:
        if not list((job / "progress").glob(f"{stage}-*.json")):
            break
        f = stage_progress(job, stage)
        eta = (
            "done"
            if f["running"] == 0
            else (f"ETA {f['eta_s']:.0f} s" if f["eta_s"] is not None else "ETA -")
        )
        unit = "buckets" if stage == "dedup" else "MB"
        scale = 1 if stage == "dedup" else 1e6
        lines.append(
            f"  {stage}: {f['tasks_done']}/{f['tasks']} tasks, {f['running']} workers running, "
            f"{f['documents']:,} documents, {f['bytes'] / scale:,.1f} of {f['bytes_total'] / scale:,.1f} {unit}, "
            f"{f['mb_per_s'] * (1e6 / scale):.2f} {unit}/s, {eta}"
        )
    return "\n".join(lines)


def slurm_scripts(job: str | Path, workers: int, options: list[str] = ()) -> list[Path]:
    """One sbatch script per stage (a job array of the job's workers) and one for the merge, in order.
    `options`: sbatch options for every script (`--partition=cpu`, `--time=2-00:00:00`, ...)."""
    job = Path(job).resolve()
    plan = read_plan(job)
    folder = job / "slurm"
    folder.mkdir(exist_ok=True)
    (job / "logs").mkdir(exist_ok=True)
    scripts = []
    for stage in [*plan["stages"], "merge"]:
        header = [f"#SBATCH --job-name=teleflm-data-{stage}", *(f"#SBATCH {o}" for o in options)]
        if stage == "merge":
            header.append(f"#SBATCH --output={job / 'logs' / 'merge.log'}")
            command = [*worker_command(job, "merge", "0", 1)]
        else:
            header += [
                f"#SBATCH --array=0-{plan['jobs'] - 1}",
                f"#SBATCH --output={job / 'logs' / stage}-%a.log",
            ]
            command = worker_command(job, stage, "WORKER", workers)
        line = shlex.join(command).replace("WORKER", '"$SLURM_ARRAY_TASK_ID"')
        script = folder / f"{len(scripts)}-{stage}.sbatch"
        script.write_text(
            "\n".join(["#!/bin/bash", *header, f"cd {shlex.quote(os.getcwd())}", f"exec {line}", ""])
        )
        scripts.append(script)
    return scripts


def submit_slurm(job: str | Path, workers: int, options: list[str] = (), submit: bool = True) -> list[str]:
    """Write the job's sbatch scripts and submit them with `sbatch`, each stage after the last
    succeeded (`--dependency=afterok`); returns the Slurm job ids (or the scripts, `submit=False`)."""
    scripts = slurm_scripts(job, workers, options)
    if not submit:
        return [str(s) for s in scripts]
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch is not on PATH: run on a Slurm login node (or use --engine local)")
    ids: list[str] = []
    for script in scripts:
        dependency = [f"--dependency=afterok:{ids[-1]}"] if ids else []
        result = subprocess.run(
            ["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {result.stderr.strip() or result.stdout.strip()}")
        ids.append(result.stdout.strip().split(";")[0])
    return ids
