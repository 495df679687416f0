"""`make test`'s `--dist loadgroup` finishes when a worker dies: the dead test is reported once as
failed, every other test runs (pytest-xdist 3.8.0 alone hangs here for ever; tests/xdist_crash_safe.py)."""

import pathlib
import subprocess
import sys
import textwrap

from machine import scaled

HERE = pathlib.Path(__file__).resolve().parent

TESTS = textwrap.dedent("""
    import os, time, pytest

    @pytest.mark.parametrize("i", range(6))
    def test_free(i):
        time.sleep(0.2)

    @pytest.mark.xdist_group("g")
    def test_g1():
        time.sleep(0.5)

    @pytest.mark.xdist_group("g")
    def test_g2():
        os._exit(1)   # as an abort in native code does

    @pytest.mark.xdist_group("g")
    def test_g3():
        pass

    @pytest.mark.parametrize("i", range(6))
    def test_more(i):
        time.sleep(0.2)
""")


def test_a_dead_worker_fails_its_test_and_the_run_finishes(tmp_path):
    (tmp_path / "conftest.py").write_text("pytest_plugins = ['xdist_crash_safe']\n")
    (tmp_path / "test_crash.py").write_text(TESTS)
    env = {"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                          "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=scaled(120))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 14 passed" in out.stdout, out.stdout
    assert "FAILED test_crash.py::test_g2" in out.stdout
