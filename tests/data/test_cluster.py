"""`teleflm data prepare` on many workers: 1, 2 and 4 local workers write the same shards; a worker
killed mid-stage is rerun alone and the job completes the same, without redoing finished work; the
Slurm engine's scripts run the same job."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import zstandard

from teleflm.cli.main import main
from teleflm.data import sample
from teleflm.data.cluster import describe_progress
from teleflm.data.prepare import (
    JOB,
    WorkerFailed,
    merge,
    plan_job,
    prepare,
    read_plan,
    run_local,
    run_worker,
    worker_command,
)
from teleflm.data.shards import open_shards, verify_shards
from teleflm.data.synthetic import synthetic_documents
from tests.data.conftest import write_jsonl


def write_corpus(folder, tokenizer_dir):
    """The embedded sample (three domains) and a synthetic domain over several files and formats, one
    cut into byte ranges, with duplicates planted across files, parts and domains; dedup and filters on;
    parts of 128 kB: many parts per domain, so that every worker has several."""
    sample.write_sample_corpus(folder)
    synthetic = list(synthetic_documents(1200, mean_words=60, seed=3))
    kjv = sample.kjv_chapters()
    planted = [synthetic[5].upper(), synthetic[100] + " and", kjv[3]]  # an exact, a near, a cross-domain copy
    low_quality = ["too short to keep", " ".join(["the same words again"] * 20)]
    write_jsonl(folder / "syn-a.jsonl", synthetic[:300] + low_quality)
    write_jsonl(folder / "syn-b.jsonl", synthetic[300:] + planted)  # larger than a part: byte ranges
    (folder / "syn-c.txt.zst").write_bytes(
        zstandard.ZstdCompressor().compress("\n\n".join(synthetic[:20]).encode())
    )
    toml = (folder / "data.toml").read_text().replace('"../tokenizer"', f'"{tokenizer_dir}"')
    toml = toml.replace('out = "../shards"', 'out = "shards"\npart_bytes = 131072')
    toml += textwrap.dedent("""
        [[domains]]
        name = "synthetic"
        inputs = ["syn-*.jsonl", "syn-c.txt.zst"]
        proportion = 0.1
        [domains.filters]
        min_words = 30
        max_duplicate_ngram_fraction = { 5 = 0.15 }

        [dedup]
        exact = true
        near = true
        """)
    (folder / "data.toml").write_text(toml)
    return folder / "data.toml"


def checksums(shards_dir) -> dict:
    """Every shard file's sha256, by path: what must be the same whatever the workers."""
    return {
        str(p.relative_to(shards_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(shards_dir.glob("*/*-*.*"))
    }


def stable(manifest: dict) -> dict:
    """The manifest less what depends on the workers and the clock."""
    domains = {
        name: {k: v for k, v in entry.items() if k != "seconds"}
        for name, entry in manifest["domains"].items()
    }
    return {**{k: v for k, v in manifest.items() if k not in ("job", "domains")}, "domains": domains}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_dir):
    return write_corpus(tmp_path_factory.mktemp("corpus"), tokenizer_dir)


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "shards"
    manifest = prepare(corpus, out=out, progress=False, workers=1)
    return out, manifest


@pytest.mark.parametrize("jobs", [2, 4])
def test_workers_write_the_shards_of_one_worker(corpus, one_worker, tmp_path, jobs):
    reference, expected = one_worker
    out = tmp_path / "shards"
    manifest = prepare(corpus, out=out, progress=False, jobs=jobs, workers=1)
    assert checksums(out) == checksums(reference) and len(checksums(out)) > 6 * 8
    assert stable(manifest) == stable(expected)
    assert (out / "dedup_examples.json").read_text() == (reference / "dedup_examples.json").read_text()
    verify_shards(open_shards(out))
    # The planted copies went, whichever worker held them; the part cut into byte ranges is there.
    synthetic = manifest["domains"]["synthetic"]
    # 20 documents of syn-c.txt.zst repeat syn-a's; an upper-cased copy; a copy of a KJV chapter.
    assert synthetic["deduplicated"] == {"exact": 22, "near": 1}
    assert synthetic["parts"] > 3 and synthetic["filtered"] == {"min_words": 1, "duplicate_ngram": 1}
    job = manifest["job"]
    assert job["engine"] == "local" and job["workers"] == jobs
    assert {row["worker"] for row in job["stages"]["encode"]} == set(range(jobs))
    assert sum(row["documents"] for row in job["stages"]["encode"]) == sum(
        d["documents_read"] for d in manifest["domains"].values()
    )
    lines = describe_progress(out).splitlines()
    assert lines[0].endswith("stages scan, dedup, encode") and all(
        "0 workers running" in ln for ln in lines[1:]
    )


def test_a_killed_worker_is_rerun_alone_and_the_job_completes_the_same(corpus, one_worker, tmp_path):
    """Worker 1 of 4 is killed (SIGKILL, no clean-up) right after it records its first encoded part;
    the others finish. Rerunning worker 1 alone finishes the job: the same shards as one worker's, and
    nothing another worker did, nor worker 1's first part, is done again."""
    reference, _ = one_worker
    out = tmp_path / "shards"
    job = plan_job(corpus, out=out, jobs=4)
    for stage in ("scan", "dedup"):
        for worker in range(4):
            run_worker(job, stage, worker, workers=1)
    kill_after_first_part = textwrap.dedent(f"""
        import os, signal, sys
        import teleflm.data.prepare as prepare
        write = prepare._write_json_atomic
        def write_then_die(path, value):
            write(path, value)
            if path.parent.name == "encode":  # the first encoded part is recorded: die here
                os.kill(os.getpid(), signal.SIGKILL)
        prepare._write_json_atomic = write_then_die
        prepare.run_worker({str(job)!r}, "encode", 1, workers=1)
        """)
    processes = [
        subprocess.Popen([sys.executable, "-c", kill_after_first_part])
        if w == 1
        else subprocess.Popen(worker_command(job, "encode", str(w), 1))
        for w in range(4)
    ]
    assert [p.wait() for p in processes] == [0, -signal.SIGKILL, 0, 0]
    plan = read_plan(job)
    # Every input byte is in one part (the sizes the tasks are dealt and the progress measured by).
    assert sum(plan["sizes"]["encode"]) == sum(s for d in plan["domains"] for s, _ in d["files"].values())
    mine = [plan["tasks"]["encode"][t] for t in plan["assignment"]["encode"][1]]
    assert len(mine) >= 2
    records = sorted((job / "encode").glob("*.json"))
    assert len(records) == len(plan["tasks"]["encode"]) - len(mine) + 1
    with pytest.raises(RuntimeError, match=r"parts not encoded yet: .*\(worker 1\)"):
        merge(job)
    shard_files = [p for p in out.glob("*/*-*.*") if p.is_file()]  # not the killed part's temporary folder
    before = {p: p.stat().st_mtime_ns for p in [*records, *shard_files]}

    assert subprocess.run(worker_command(job, "encode", "1", 1)).returncode == 0  # worker 1 alone
    manifest = merge(job)
    assert checksums(out) == checksums(reference)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing done twice
    assert manifest["complete"] and open_shards(out).domains == list(manifest["domains"])


def test_a_failed_local_worker_names_the_rerun(corpus, tmp_path, monkeypatch):
    """The local engine reports which worker failed and the command that reruns it alone; running
    prepare again then finishes."""
    out = tmp_path / "shards"
    good = corpus.parent / "syn-a.jsonl"
    saved = good.read_bytes()
    plan_job(corpus, out=out, jobs=2)  # the job as it will run, then one input damaged under it
    good.write_text('{"text": "fine"}\nnot json\n')
    try:
        with pytest.raises(
            WorkerFailed, match=r"worker \d of 2 failed in stage scan .*rerun it alone: .*--stage scan"
        ):
            run_local(out / JOB, workers=1, progress=False)
    finally:
        good.write_bytes(saved)
        os.utime(good, ns=(read_plan(out / JOB)["domains"][3]["files"][str(good)][1],) * 2)
    run_local(out / JOB, workers=1, progress=False)
    assert merge(out / JOB)["complete"]


def test_slurm_scripts_run_the_same_job(corpus, one_worker, tmp_path, monkeypatch, capsys):
    """`--engine slurm` writes a job array per stage and a merge, submitted in a chain of afterok
    dependencies. A stand-in sbatch runs each array's tasks here, as Slurm would set them."""
    reference, _ = one_worker
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"
    fake.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import os, re, subprocess, sys
        script = sys.argv[-1]
        text = open(script).read()
        with open({str(log)!r}, "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\\n")
        found = re.search(r"--array=0-(\\d+)", text)
        for task in range(int(found.group(1)) + 1 if found else 1):
            env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(task))
            if subprocess.run(["bash", script], env=env).returncode:
                sys.exit(1)
        print(f"{{abs(hash(script)) % 100000}};cluster")
        """)
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "shards"
    args = ["data", "prepare", "--config", str(corpus), "--out", str(out), "--engine", "slurm", "--jobs", "3"]
    assert main([*args, "--workers", "1", "--slurm-option=--partition=cpu"]) == 0
    submitted = log.read_text().splitlines()
    assert len(submitted) == 4 and "--dependency=afterok:" in submitted[1]
    script = (out / JOB / "slurm" / "0-scan.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=cpu" in script
    assert '--worker "$SLURM_ARRAY_TASK_ID"' in script
    assert checksums(out) == checksums(reference)
    assert json.loads((out / "manifest.json").read_text())["job"]["engine"] == "slurm"
    assert "progress: teleflm data progress" in capsys.readouterr().out
