"""The per-test CPU profile plugin (tests/cpu_profile.py): a row per test with its own and its
subprocesses' CPU seconds, and the session summary listing the hottest first."""

import os
import subprocess
import sys
import textwrap

import cpu_profile
from machine import scaled


def test_profile_rows_count_own_and_child_cpu(tmp_path):
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import subprocess, sys, time

        def test_spin():
            end = time.process_time() + 0.3
            while time.process_time() < end:
                pass

        def test_child():
            end = time.process_time() + 0.3   # and as much in the child
            while time.process_time() < end:
                pass
            subprocess.run([sys.executable, "-c",
                            "import time\\nend = time.process_time() + 0.3\\n"
                            "while time.process_time() < end: pass"], check=True)
    """))
    (tmp_path / "conftest.py").write_text(
        "import cpu_profile\n\ndef pytest_configure(config):\n    cpu_profile.register(config)\n")
    out = tmp_path / "profile.jsonl"
    env = dict(os.environ, VSALMONN_TEST_PROFILE=str(out),
               PYTHONPATH=os.pathsep.join([os.path.dirname(cpu_profile.__file__),
                                           os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "test_x.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=scaled(120))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["test"]: r for r in cpu_profile.read(str(out))}
    spin, child = rows["test_x.py::test_spin"], rows["test_x.py::test_child"]
    assert spin["cpu_s"] >= 0.3 and spin["children_cpu_s"] < 0.1
    assert child["children_cpu_s"] >= 0.3 and child["cpu_s"] >= 0.3
    assert "CPU time per test" in done.stdout
    assert cpu_profile.top(list(rows.values()), n=1)[0].endswith("test_x.py::test_child")  # 2 x 0.3 s
