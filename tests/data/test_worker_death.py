"""Issue 18 item 1: a data worker killed with -9 stops the trainer within 60 s with a clear message
and a checkpoint (never a hang); SIGTERM is honoured while the trainer waits on data; a trainer killed
with -9 leaves no orphaned workers. Real subprocesses: training loop + grain loader with 2 workers."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import fake_devices
import pytest
from machine import scaled
from procs import alive

RUNNER = pathlib.Path(__file__).with_name("worker_death_run.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Live (not zombie) grain worker processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmd:
            out.append(int(entry.name))
    return sorted(out)


def _start(data, workdir, log):
    """The runner in a subprocess; its output goes to `log` (a pipe nobody reads would fill up)."""
    env = dict(fake_devices.env(1), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(RUNNER), str(data), str(workdir)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc, timeout: float, what: str) -> str:
    try:
        proc.wait(timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{what} within {scaled(timeout):.0f} s")
    return pathlib.Path(proc.log).read_text()


def _wait_for_rows(proc, workdir, rows: int, timeout: float = 600):
    """Wait until metrics.jsonl has `rows` rows and both workers run; return the worker pids."""
    path = workdir / "metrics.jsonl"
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        assert proc.poll() is None, pathlib.Path(proc.log).read_text()[-3000:]
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            workers = _children(proc.pid)
            if len(workers) == 2:
                return workers
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {rows} metrics rows within {timeout} s")


def _steps(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run(synth_dir, tmp_path):
    procs = []

    def start(workdir):
        procs.append(_start(synth_dir, workdir, tmp_path / f"log{len(procs)}.txt"))
        return procs[-1]
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_dead_worker_stops_with_a_message_and_a_checkpoint(run, tmp_path):
    workdir = tmp_path / "run"
    proc = run(workdir)
    workers = _wait_for_rows(proc, workdir, 3)
    os.kill(workers[0], signal.SIGKILL)
    killed = time.monotonic()
    err = _finish(proc, 60, "the trainer did not stop after its data worker's death")
    assert time.monotonic() - killed < 60
    assert proc.returncode == 3, err[-3000:]
    assert f"stopped: data worker process {workers[0]} ended with exit code -9" in err
    steps = _steps(workdir)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [steps[-1]] and steps == list(range(1, steps[-1] + 1))
    deadline = time.monotonic() + scaled(30)
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers)


@pytest.mark.slow
def test_sigterm_while_waiting_on_data_then_kill_leaves_no_orphans(run, tmp_path):
    workdir = tmp_path / "run"
    proc = run(workdir)
    workers = _wait_for_rows(proc, workdir, 2)
    for w in workers:   # the data never comes: the trainer waits on it
        os.kill(w, signal.SIGSTOP)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    err = _finish(proc, 60, "SIGTERM was not honoured while the trainer waited on data")
    for w in workers:
        if alive(w):
            os.kill(w, signal.SIGCONT)
    assert proc.returncode == 0 and "preempted=True" in err, err[-3000:]
    step = int(err.split("preempted=True step=")[1].split()[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()
    # resume, then kill -9 the trainer: its workers notice and exit
    proc = run(workdir)
    workers = _wait_for_rows(proc, workdir, step + 2)
    assert _steps(workdir) == list(range(1, len(_steps(workdir)) + 1))   # no duplicate rows
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + scaled(30)
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "orphaned data workers after kill -9 of the trainer"
