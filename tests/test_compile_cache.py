"""The persistent compilation cache: where it lives, how it is switched off, that a second CLI run
of the same job compiles nothing new (every executable comes from the cache), and its size limit."""

import os
import pathlib
import subprocess
import sys

import pytest
from machine import scaled, slowdown

from vsalmonn_jax import cli, compile_cache

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "vsalmonn_jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None


def test_multi_process_cpu_runs_go_uncached(monkeypatch):
    """2 CPU processes with executables from a warm cache hung in their first step's collectives
    (a tiny AV mrDPO round, 5 of 5 tries; uncached it finished): such runs switch the cache off."""
    import jax

    monkeypatch.setenv(compile_cache.ENV, "")   # restored after the test, whatever it sets
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    assert not compile_cache.off_for_multiprocess_cpu()
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not compile_cache.off_for_multiprocess_cpu() and compile_cache.ENV not in os.environ
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    before = jax.config.jax_enable_compilation_cache
    try:
        assert compile_cache.off_for_multiprocess_cpu()
        assert os.environ[compile_cache.ENV] == "off" and not jax.config.jax_enable_compilation_cache
        assert compile_cache.enable() is None
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def test_a_second_run_compiles_nothing_new(tmp_path):
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT"))}
    env[compile_cache.ENV] = str(cache)
    # every executable is written, whatever its compile time: with the default 0.5-s floor, a step that
    # compiled in 0.45 s in the first run and 0.55 s in the second (a busy machine) was written only then
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

    def train(name: str) -> set[str]:
        cmd = [sys.executable, "-m", "vsalmonn_jax.cli", "train", "--config", "configs/tiny_sft.py",
               "--config.data.train=synthetic:8", "--config.train.num_steps=2",
               "--config.train.checkpoint_every=2", "--config.train.eval_every=100",
               "--workdir", str(tmp_path / name), "--no-progress"]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=scaled(600))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return {p.name for p in cache.iterdir()}

    first = train("a")
    assert any(name.startswith("jit_step-") for name in first), first   # the train step was written
    assert train("b") == first                                       # ... and read back, not rebuilt


def test_slowdown_grows_with_the_load(monkeypatch):
    assert slowdown() >= 1.0
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0 * (os.cpu_count() or 1), 0.0, 0.0))
    assert slowdown() >= 8.0 and scaled(10) >= 80.0


@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_setting_means_the_default_folder(monkeypatch, value):
    monkeypatch.setenv(compile_cache.ENV, value)
    assert compile_cache.cache_dir().parts[-2:] == ("vsalmonn_jax", "xla")


def test_trim_deletes_the_least_recently_used_entries_first(tmp_path):
    """Five 100-byte entries used at t = 1..5 (access or write time, whichever is later), a limit of
    250 bytes: the three oldest go; files that are not JAX entries stay whatever their size."""
    for t, name in enumerate(["e", "a", "d", "b", "c"], start=1):
        entry = tmp_path / f"jit_step-{name}-cache"
        entry.write_bytes(b"x" * 100)
        os.utime(entry, (t, 1) if name != "a" else (1, 9))   # "a": read long ago, written at t = 9
    (tmp_path / "notes.txt").write_bytes(b"y" * 1000)
    (tmp_path / "xla_gpu").mkdir()
    assert compile_cache.trim(tmp_path, 250) == (3, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "jit_step-a-cache", "jit_step-c-cache", "notes.txt", "xla_gpu"]
    assert compile_cache.trim(tmp_path, 250) == (0, 0)
    assert compile_cache.trim(tmp_path, 0) == (2, 200)


def test_the_size_limit_follows_the_environment(monkeypatch, capsys):
    monkeypatch.delenv(compile_cache.MAX_GB_ENV, raising=False)
    assert compile_cache.max_bytes() == compile_cache.DEFAULT_MAX_GB * 1e9
    monkeypatch.setenv(compile_cache.MAX_GB_ENV, "2.5")
    assert compile_cache.max_bytes() == 2.5e9
    monkeypatch.setenv(compile_cache.MAX_GB_ENV, "unlimited")
    assert compile_cache.max_bytes() == float("inf")
    for bad in ("abc", "0", "-1", "nan"):
        monkeypatch.setenv(compile_cache.MAX_GB_ENV, bad)
        with pytest.raises(ValueError, match=f"VSALMONN_JAX_CACHE_MAX_GB='{bad}': give a size in GB"):
            compile_cache.max_bytes()
    # the CLI stops before any work with that message
    assert cli.main(["config", "show", "--config", "configs/tiny.py"]) == 2
    assert "VSALMONN_JAX_CACHE_MAX_GB='nan'" in capsys.readouterr().err


def test_the_multi_host_entry_point_asks_for_it(monkeypatch, capsys):
    """`python -m vsalmonn_jax.distributed CMD` starts jax.distributed, then switches the cache off
    where off_for_multiprocess_cpu says so, before the command runs."""
    from vsalmonn_jax import distributed

    spec = distributed.ClusterSpec("explicit", 2, 0, "127.0.0.1:1", None)
    calls = []
    monkeypatch.setattr(distributed, "initialize", lambda: calls.append("init") or spec)
    monkeypatch.setattr(compile_cache, "off_for_multiprocess_cpu", lambda: calls.append("off") or True)
    monkeypatch.setattr(cli, "main", lambda argv: calls.append(argv) or 0)
    assert distributed.main(["eval", "--help"]) == 0
    assert calls == ["init", "off", ["eval", "--help"]]
    assert "the compile cache is off" in capsys.readouterr().out
