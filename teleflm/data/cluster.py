"""Engines that run a `teleflm data prepare` job's stages on many workers: N processes on this machine,
or a Slurm job array per stage (on the cluster's shared file system), and the job's progress.

Both run the same command per worker, `teleflm data worker --job DIR --stage STAGE --worker I`
(teleflm.data.prepare.run_worker): a worker runs its own tasks and skips those already recorded
as done, so a failed worker is rerun alone by running its command again, and rerunning the whole job
redoes only what is missing.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from teleflm.data.prepare import read_plan, run_worker


class WorkerFailed(RuntimeError):
    pass


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_command(job: Path, stage: str, worker: str, workers: int) -> list[str]:
    """The command that runs one worker of one stage (`worker` may be a shell variable)."""
    return [
        sys.executable,
        "-m",
        "teleflm.cli.main",
        "data",
        "worker",
        "--job",
        str(Path(job).resolve()),
        "--stage",
        stage,
        "--worker",
        worker,
        "--workers",
        str(workers),
    ]


def run_local(job: str | Path, workers: int = 0, progress: bool = True) -> None:
    """Every stage of the job on this machine: with one job worker, here; with N, N processes at
    once (each with `workers` encoding processes, default the cores shared among them), stage after
    stage. A failed worker stops the job after the others finish their tasks; the error says how to
    rerun it alone."""
    job = Path(job)
    plan = read_plan(job)
    jobs = plan["jobs"]
    for stage in plan["stages"]:
        if jobs == 1:
            run_worker(job, stage, 0, workers, progress)
            continue
        per_worker = workers or max(1, _cores() // jobs)
        logs = job / "logs"
        logs.mkdir(exist_ok=True)
        processes = []
        for w in range(jobs):
            with (logs / f"{stage}-{w:05d}.log").open("w") as log:
                command = worker_command(job, stage, str(w), per_worker)
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        _watch(job, stage, processes, progress)
        failed = [(w, p.returncode) for w, p in enumerate(processes) if p.returncode != 0]
        if failed:
            lines = [
                f"worker {w} of {jobs} failed in stage {stage} (exit {rc}); its log: {logs / f'{stage}-{w:05d}.log'}; "
                f"rerun it alone: {shlex.join(worker_command(job, stage, str(w), per_worker))}"
                for w, rc in failed
            ]
            raise WorkerFailed("\n".join(lines) + "\nthen run the same prepare again: finished work is kept")


def _watch(job: Path, stage: str, processes: list, progress: bool) -> None:
    """Wait for the processes, with one progress bar for all of them (from their progress files)."""
    bar = None
    if progress:
        from tqdm import tqdm

        plan = read_plan(job)
        total = sum(plan["sizes"][stage]) if stage != "dedup" else len(plan["tasks"][stage])
        bar = tqdm(total=total, unit="B" if stage != "dedup" else "bucket", unit_scale=True, desc=stage)
    while any(p.poll() is None for p in processes):
        if bar is not None:
            figures = stage_progress(job, stage)
            bar.n = figures["bytes"]
            bar.set_postfix(documents=f"{figures['documents']:,}", running=figures["running"], refresh=False)
            bar.refresh()
        time.sleep(0.5)  # polling the workers' files, not a wait for any result
    if bar is not None:
        bar.n = stage_progress(job, stage)["bytes"]
        bar.close()


def stage_progress(job: Path, stage: str) -> dict:
    """The whole job's progress in one stage, summed over its workers' progress files: documents,
    bytes (of input), bytes_total, MB/s since the first worker started, ETA in seconds."""
    states = [json.loads(p.read_text()) for p in sorted((job / "progress").glob(f"{stage}-*.json"))]
    plan = read_plan(job)
    total = sum(plan["sizes"][stage]) if stage != "dedup" else len(plan["tasks"][stage])
    done = sum(s["bytes"] for s in states)
    started = min((s["started"] for s in states), default=time.time())
    ended = max((s["updated"] for s in states), default=started)
    rate = done / max(ended - started, 1e-9)
    return {
        "stage": stage,
        "workers": len(states),
        "running": sum(s["finished"] is None for s in states),
        "tasks_done": sum(s["tasks_done"] for s in states),
        "tasks": len(plan["tasks"][stage]),
        "documents": sum(s["documents"] for s in states),
        "bytes": done,
        "bytes_total": total,
        "mb_per_s": rate / 1e6,
        "eta_s": (total - done) / rate if rate > 0 else None,
    }


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
