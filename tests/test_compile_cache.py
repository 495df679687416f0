"""The persistent compilation cache: where it lives, how it is switched off, and that a second CLI run
of the same job compiles nothing new (every executable comes from the cache)."""

import os
import pathlib
import subprocess
import sys

import pytest
from machine import scaled, slowdown

from vsalmonn_jax import compile_cache

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "vsalmonn_jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None


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
