"""Hyper-parameter search on a muP proxy, in a study that any number of workers share.

A search space (TOML) names some of the card's seven hyper-parameters with a grid of values or a
range; the others keep the config's values or are derived from searched ones:

    method = "grid"        # grid | random | tpe (Optuna's TPE sampler)
    trials = 16            # random / tpe: how many
    seed = 0
    parallel = 2           # worker processes started here, each running one trial at a time
    threads_per_trial = 1

    [params.lr]
    values = [1e-3, 3e-3, 1e-2]    # grid (random/tpe: picks among them)
    [params.std]
    low = 1e-3                     # a range: random / tpe only
    high = 1e-1
    log = true

    [derived]
    matrix_lr = "lr"               # a searched name, optionally times a number
    min_lr = "0.1 * lr"

The study lives in Optuna's RDB storage: by default a SQLite file, `<out>/study.db`; on a cluster a
PostgreSQL or MySQL URL (`--storage`) that every worker reaches. Each worker is the same command, run
anywhere (`--parallel` processes here, a Slurm array, torchrun ranks, plain processes on other
machines): it takes a trial, trains the proxy, records the result, and takes the next until none is
left. The worker that creates the study queues its planned trials (grid and random: every trial is
known in advance), so each is claimed by exactly one worker; tpe asks Optuna's sampler for each new
trial. A worker that dies mid-trial leaves its trial running: a worker on the same machine sees at
once that its process is gone, a worker anywhere sees its heartbeat stop (`--heartbeat` seconds, and
twice that of grace); either fails it and queues it again, so another worker runs it. A search started
again with the same storage and study continues where it stopped. `<out>/best.toml` holds the best set.
"""

import itertools
import math
import os
import random
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import optuna
import sqlalchemy

from teleflm.config import AT_LEAST_ONE, ConfigError, build, read_toml
from teleflm.tune.runs import SEARCHED, RunData, scored_run, with_hyperparams

METHODS = ("grid", "random", "tpe")


@dataclass
class ParamRange:
    values: list[float] | None = None  # explicit choices
    low: float | None = None
    high: float | None = None
    log: bool = True


@dataclass
class SpaceTable:
    """The search space TOML, as written."""

    params: dict[str, ParamRange] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)  # name -> "SOURCE" or "NUMBER * SOURCE"
    method: str = "grid"
    trials: int = 16
    seed: int = 0
    parallel: int = 1  # worker processes `teleflm mup search` starts here (each runs one trial at a time)
    threads_per_trial: int = 1

    RANGES = dict(trials=AT_LEAST_ONE, parallel=AT_LEAST_ONE, threads_per_trial=AT_LEAST_ONE)


@dataclass
class SearchSpace:
    params: dict[str, ParamRange]
    derived: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (source, factor)
    method: str = "grid"
    trials: int = 16
    seed: int = 0
    parallel: int = 1
    threads_per_trial: int = 1


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _derived(name: str, expression: str, searched: set[str]) -> tuple[str, float]:
    factor, source = 1.0, expression.replace(" ", "")
    if "*" in source:
        left, right = source.split("*", 1)
        number, source = (right, left) if _is_number(right) else (left, right)
        if not _is_number(number):
            raise ValueError(f"[derived] {name} = {expression!r}: expected 'NAME' or 'NUMBER * NAME'")
        factor = float(number)
    if source not in searched:
        raise ValueError(f"[derived] {name} = {expression!r}: {source!r} is not a searched parameter")
    return source, factor


def load_space(path: str | Path) -> SearchSpace:
    where = str(path)
    table = build(SpaceTable, read_toml(path), where)
    for name, p in table.params.items():
        if name not in SEARCHED:
            raise ConfigError(f"{where}: [params.{name}] is not one of the searched {sorted(SEARCHED)}")
        if p.values is None and (p.low is None or p.high is None or not 0 < p.low < p.high):
            raise ConfigError(f"{where}: [params.{name}] needs `values` or 0 < `low` < `high`")
        if p.values is not None and not p.values:
            raise ConfigError(f"{where}: [params.{name}].values is empty")
    if not table.params:
        raise ConfigError(f"{where}: no [params.NAME] table: nothing to search")
    derived = {}
    for name, expression in table.derived.items():
        if name not in SEARCHED or name in table.params:
            raise ConfigError(
                f"{where}: [derived] {name}: must be a searched name that is not itself searched"
            )
        derived[name] = _derived(name, expression, set(table.params))
    if table.method not in METHODS:
        raise ConfigError(f"{where}: method must be one of {METHODS}, got {table.method!r}")
    if table.method == "grid" and any(p.values is None for p in table.params.values()):
        raise ConfigError(f"{where}: grid search needs `values` for every parameter")
    fields = {k: getattr(table, k) for k in ("method", "trials", "seed", "parallel", "threads_per_trial")}
    return SearchSpace(table.params, derived, **fields)


def full_values(space: SearchSpace, sampled: dict) -> dict:
    """A trial's searched values plus the derived ones."""
    values = dict(sampled)
    for name, (source, factor) in space.derived.items():
        values[name] = sampled[source] * factor
    return values


def planned_trials(space: SearchSpace) -> list[dict]:
    """The searched values of every trial, in a fixed order (so trial i is the same on every resume)."""
    names = list(space.params)
    if space.method == "grid":
        grid = itertools.product(*(space.params[n].values for n in names))
        return [full_values(space, dict(zip(names, combo, strict=True))) for combo in grid]
    rng = random.Random(space.seed)
    trials = []
    for _ in range(space.trials):
        sampled = {}
        for n in names:
            p = space.params[n]
            if p.values is not None:
                sampled[n] = rng.choice(p.values)
            elif p.log:
                sampled[n] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                sampled[n] = rng.uniform(p.low, p.high)
        trials.append(full_values(space, sampled))
    return trials


# ----- the study -----

HEARTBEAT_S = 60
# Workers here ask and tell trials themselves (one queue, per-trial heartbeats) instead of Optuna's
# optimize loop, which is what these warn about.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", module="optuna")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
READY_TIMEOUT_S = 300  # how long a worker waits for the study's creator to queue the planned trials


SQLITE_BUSY_TIMEOUT_S = 60  # how long a worker waits for another's transaction on a SQLite study


def serialize_sqlite_transactions(engine) -> None:
    """Make each transaction on this SQLite engine take the database's write lock when it begins.

    Optuna claims a queued trial by reading its state (SELECT ... FOR UPDATE) and then writing it.
    SQLite ignores FOR UPDATE and Python's sqlite3 starts a transaction only at the write, so two
    workers could both read WAITING and both run the trial (seen with 2 workers on 2 busy cores).
    With BEGIN IMMEDIATE the read and the write are one critical section; PostgreSQL and MySQL honour
    FOR UPDATE and need nothing (SQLAlchemy's recipe for pysqlite transactions)."""

    def own_transactions(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # sqlite3 leaves BEGIN to SQLAlchemy's "begin" below

    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", own_transactions)
    sqlalchemy.event.listen(engine, "begin", begin_immediate)
    engine.dispose()  # the connections RDBStorage opened before the listeners were there


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out / 'study.db').resolve()}"


def open_study(url: str, name: str, space: SearchSpace, heartbeat_s: int = HEARTBEAT_S):
    """The study `name` in `url`, created (with its planned trials queued) by the first worker to get
    there, loaded by the others once the queue is complete."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sqlite = url.startswith("sqlite")
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if sqlite else None,
        heartbeat_interval=heartbeat_s,
        grace_period=2 * heartbeat_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None),
    )
    if sqlite:
        serialize_sqlite_transactions(storage.engine)
    sampler = (
        optuna.samplers.TPESampler(seed=space.seed)
        if space.method == "tpe"
        else optuna.samplers.RandomSampler()
    )
    plan = planned_trials(space) if space.method != "tpe" else []
    signature = {"method": space.method, "trials": space.trials, "plan": plan}
    try:  # creating a study is atomic: one worker wins and fills the queue
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "signature" not in study.user_attrs:
            if time.monotonic() > deadline:
                raise ValueError(f"study {name!r} in {url} was created but never filled: delete it") from None
            time.sleep(0.2)
        if study.user_attrs["signature"] != signature:
            raise ValueError(
                f"study {name!r} in {url} holds another search (its method or planned trials differ): "
                "use another --study or --out"
            ) from None
        return study
    for index, values in enumerate(plan):
        study.enqueue_trial(searched_params(space, values), user_attrs={"plan_index": index})
    study.set_user_attr("signature", signature)
    return study


def searched_params(space: SearchSpace, values: dict) -> dict:
    return {name: values[name] for name in space.params}


def suggested(trial, space: SearchSpace) -> dict:
    """The trial's searched values: a queued trial's own, else what the sampler picks."""
    return {
        n: trial.suggest_categorical(n, p.values)
        if p.values is not None
        else trial.suggest_float(n, p.low, p.high, log=p.log)
        for n, p in space.params.items()
    }


def reclaim_dead_local_trials(study) -> int:
    """Fail and queue again the running trials whose worker ran on this machine and is gone; returns
    how many this worker reclaimed (another worker may reclaim one first: the state change is atomic)."""
    reclaimed = 0
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.system_attrs.get("teleflm_worker")
        if worker is None or worker["host"] != socket.gethostname() or pid_alive(worker["pid"]):
            continue
        try:
            if study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
                retry(study, study._storage.get_trial(trial._trial_id))
                reclaimed += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return reclaimed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """Records the trial's heartbeat every interval while it runs, so workers elsewhere know it lives."""

    def __init__(self, study, trial_id: int, interval: int):
        self.study, self.trial_id, self.interval = study, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, daemon=True)

    def beat(self) -> None:
        while True:
            self.study._storage.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def records(study) -> list[dict]:
    """The finished trials' records, by trial, once each (a retried trial counts once)."""
    done = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record = trial.user_attrs["record"]
        done.setdefault(record["trial"], record)
    return [done[k] for k in sorted(done)]


# ----- workers -----


def claim(study, space: SearchSpace):
    """The next trial for this worker, or None when the search has nothing left to give."""
    reclaim_dead_local_trials(study)
    optuna.storages.fail_stale_trials(study)
    if space.method == "tpe":
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        taken = {
            t.user_attrs.get("record", {}).get("trial", t.number) for t in study.get_trials(states=states)
        }
        if len(taken) >= space.trials:
            return None
        return study.ask()
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return None
    trial = study.ask()  # takes the oldest queued trial; only one worker gets each
    if "plan_index" not in trial.user_attrs:  # another worker took the last one meanwhile
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None
    return trial


def run_worker(
    raw: dict,
    space: SearchSpace,
    out: str,
    url: str,
    name: str,
    data_path: str | None,
    heartbeat_s: int = HEARTBEAT_S,
    log=print,
) -> int:
    """Take and run trials until the study has none left; returns how many this worker ran."""
    import torch

    torch.set_num_threads(space.threads_per_trial)
    study = open_study(url, name, space, heartbeat_s)
    data = RunData.from_file(data_path)
    ran = 0
    while (trial := claim(study, space)) is not None:
        worker = {"host": socket.gethostname(), "pid": os.getpid()}
        study._storage.set_trial_system_attr(trial._trial_id, "teleflm_worker", worker)
        index = trial.user_attrs.get("plan_index", trial.number)
        values = full_values(space, suggested(trial, space))
        start = time.perf_counter()
        with Heartbeat(study, trial._trial_id, heartbeat_s):
            result = scored_run(with_hyperparams(raw, values), Path(out) / "trials" / f"{index:04d}", data)
        record = {
            "trial": index,
            "values": values,
            **result,
            "seconds": round(time.perf_counter() - start, 2),
        }
        trial.set_user_attr("record", record)
        objective = record["objective"] if math.isfinite(record["objective"]) else float("inf")
        study.tell(trial, objective, state=optuna.trial.TrialState.COMPLETE)
        ran += 1
        log(f"trial {index}: {record['status']} objective {record['objective']:.4f} {values}")
    return ran


def _worker_process(raw, space, out, url, name, data_path, heartbeat_s) -> None:
    run_worker(raw, space, out, url, name, data_path, heartbeat_s)


def search(
    raw: dict,
    space: SearchSpace,
    out: str | Path,
    data_path: str | None = None,
    storage: str | None = None,
    study_name: str = "teleflm-search",
    heartbeat_s: int = HEARTBEAT_S,
    log=print,
) -> list[dict]:
    """Run (or join, or resume) a search with `space.parallel` workers here; returns every finished
    trial's record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(out, storage)
    study = open_study(url, study_name, space, heartbeat_s)  # created here, before the workers start
    log(f"search: study {study_name!r} in {url}, {len(records(study))} trials finished so far")
    if space.parallel == 1:
        run_worker(raw, space, str(out), url, study_name, data_path, heartbeat_s, log)
    else:
        context = get_context("spawn")
        args = (raw, space, str(out), url, study_name, data_path, heartbeat_s)
        workers = [context.Process(target=_worker_process, args=args) for _ in range(space.parallel)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        failed = [w.exitcode for w in workers if w.exitcode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(workers)} search workers failed (exit codes {failed})")
    return records(study)
