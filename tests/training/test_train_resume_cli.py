"""`vsalmonn-jax train` as a user walks it (subprocesses, real signals): Ctrl-C saves and exits with a
message; --workdir reaches config.workdir; a resume with a changed lr is refused (config.json kept)
unless --allow-config-change (recorded); --init-from a typo creates nothing; metrics rows stay unique."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import fake_devices
import pytest
from machine import scaled

REPO = pathlib.Path(__file__).resolve().parents[2]
COMMON = ["--config", "tiny_sft", "--config.data.train=synthetic:64", "--config.train.log_every=1",
          "--config.train.checkpoint_every=100000", "--no-progress"]


def _env():
    return dict(fake_devices.env(1), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def _train(cwd, *args, timeout=600):   # seconds on the quiet reference machine
    return subprocess.run([sys.executable, "-m", "vsalmonn_jax.cli", "train", *COMMON, *args],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=scaled(timeout))


def _steps(workdir):
    return [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigint_saves_then_resume_checks_the_config(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = subprocess.Popen([sys.executable, "-m", "vsalmonn_jax.cli", "train", *COMMON,
                             "--config.train.num_steps=100000", "--workdir", str(workdir)],
                            cwd=tmp_path, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + scaled(600)
        while not ((workdir / "metrics.jsonl").exists() and len(_steps(workdir)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=scaled(120))
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT: saving a checkpoint and stopping" in err and "Traceback" not in err
    step = int(err.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert (workdir / "checkpoints" / str(step)).is_dir()
    config = json.loads((workdir / "config.json").read_text())
    assert config["workdir"] == str(workdir) and not (tmp_path / "runs").exists()
    original = (workdir / "config.json").read_text()

    changed = _train(tmp_path, "--config.train.lr=0.5", f"--config.train.num_steps={step + 2}",
                     "--workdir", str(workdir))
    assert changed.returncode == 2
    assert "train.lr: 0.001 -> 0.5" in changed.stderr and "--allow-config-change" in changed.stderr
    assert (workdir / "config.json").read_text() == original

    typo = _train(tmp_path, "--config.train.num_steps=2", "--workdir", str(tmp_path / "new"),
                  "--init-from", str(tmp_path / "typo"))
    assert typo.returncode == 2 and "--init-from" in typo.stderr and "no checkpoint there" in typo.stderr
    assert not (tmp_path / "typo").exists() and not (tmp_path / "new").exists()

    allowed = _train(tmp_path, "--config.train.lr=0.5", f"--config.train.num_steps={step + 2}",
                     "--workdir", str(workdir), "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert _steps(workdir) == list(range(1, step + 3))   # no duplicate rows after the resume
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["lr"] == 0.001
    assert config["run_records"]["config_changes"][0]["changes"]["train.lr"] == [0.001, 0.5]
