"""`make test`'s `--dist loadgroup` finishes when a worker dies: the dead test is reported once as
failed, every other test runs (pytest-xdist 3.8.0 alone hangs here for ever; tests/xdist_crash_safe.py)."""

import collections
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


class _Worker:
    """A WorkerController as the scheduler sees it; `dead` ones fail every send, as a closed channel."""

    def __init__(self, dead: bool = False):
        self.dead, self.shutting_down, self.sent = dead, False, []

    def send_runtest_some(self, indices):
        if self.dead:
            raise OSError("cannot send (already closed?)")
        self.sent += indices

    def shutdown(self):
        self.shutting_down = True


def test_a_report_from_a_dying_worker_sends_it_nothing_and_its_units_return_to_the_queue():
    """The race a fresh-clone `make test` hit once: the last report of a worker that has just died arrives before
    xdist notices; topping that worker up fails with OSError (stock xdist: INTERNALERROR)."""
    from xdist_crash_safe import CrashSafeLoadGroupScheduling

    # loadgroup scopes: group "g" for the first three, each other test its own
    collection = ["t.py::g1@g", "t.py::g2@g", "t.py::g3@g", "u.py::a", "u.py::b"]
    dying, alive = _Worker(dead=True), _Worker()
    sched = CrashSafeLoadGroupScheduling.__new__(CrashSafeLoadGroupScheduling)
    sched.unreachable = set()
    sched.registered_collections = {dying: collection, alive: collection}
    sched.assigned_work = {dying: {"g": {n: False for n in collection[:3]}}, alive: {}}
    sched.workqueue = collections.OrderedDict((n, {n: False}) for n in collection[3:])

    sched.mark_test_complete(dying, 0)   # g1's report; the worker then died running g2
    assert sched.unreachable == {dying} and dying.sent == []
    sched.mark_test_complete(dying, 0)   # a later report sends nothing either
    assert sched.remove_node(dying) == "t.py::g2@g"
    assert sched.unreachable == set()
    # the unit it was running (less g1, done, and g2, crashed) and the one it never got are rerun
    assert sorted(collection[i] for i in alive.sent) == ["t.py::g3@g", "u.py::a", "u.py::b"]
    assert alive.shutting_down   # nothing left to hand out


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """pytest 9 + xdist 3.8.0 alone split an `xdist_group` over the workers (the suffix went to a
    field pytest 9 no longer reads), so a grouped module built its module fixture once per worker."""
    (tmp_path / "conftest.py").write_text("pytest_plugins = ['xdist_crash_safe']\n")
    (tmp_path / "test_group.py").write_text(textwrap.dedent("""
        import os, pathlib, time, pytest

        def _log(name):
            time.sleep(0.2)
            pathlib.Path(name).write_text(os.environ["PYTEST_XDIST_WORKER"])

        @pytest.mark.parametrize("i", range(6))
        @pytest.mark.xdist_group("g")
        def test_grouped(i):
            _log(f"grouped_{i}")

        @pytest.mark.parametrize("i", range(6))
        def test_free(i):
            _log(f"free_{i}")
    """))
    env = {"PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                          "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=scaled(120))
    assert out.returncode == 0 and "12 passed" in out.stdout, out.stdout + out.stderr
    workers = {p.name: p.read_text() for p in tmp_path.glob("*_[0-9]")}
    assert len({workers[f"grouped_{i}"] for i in range(6)}) == 1, workers
    assert len(set(workers.values())) == 2, workers   # the free tests still spread
