"""Prefetch: batches built ahead in a thread, in order, with the data position of the last batch
handed out (what a checkpoint saves), errors at their place, and a thread that stops."""

import threading
import time

import numpy as np
import pytest
from machine import scaled

from vsalmonn_jax.training.policy_env import ListIterator
from vsalmonn_jax.training.prefetch import Prefetch


class Counting:
    """ListIterator over 0..n-1 that counts the batches built (and can fail at one)."""

    def __init__(self, n=10, batch=2, fail_at=None, repeat=True):
        self.built = 0
        self.fail_at = fail_at

        def collate(rows):
            if self.built == self.fail_at:
                raise ValueError(f"bad media in batch {self.built}")
            self.built += 1
            return {"example_id": np.asarray(rows)}

        self.inner = ListIterator(list(range(n)), collate, batch, seed=3, shuffle=True,
                                  repeat=repeat)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __next__(self):
        return next(self.inner)


def _ids(it, k):
    return [next(it)["example_id"].tolist() for _ in range(k)]


def _wait_for(predicate, limit_s=60.0):
    end = time.monotonic() + scaled(limit_s)
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_same_batches_and_the_position_of_the_last_batch_handed_out():
    plain = Counting()
    expected, states = [], []
    for _ in range(7):
        expected.append(next(plain.inner)["example_id"].tolist())
        states.append(plain.inner.get_state())
    source = Counting()
    with Prefetch(source, depth=2) as ahead:
        for k in range(7):
            assert next(ahead)["example_id"].tolist() == expected[k]
            assert ahead.get_state() == states[k]
        # it did build ahead while nobody asked: the 2 queued batches, and maybe a third that
        # waits for room in the queue
        assert _wait_for(lambda: source.built >= 9)
        assert source.built <= 10
        assert ahead.get_state() == states[6]   # not counted until handed out


def test_resume_from_a_saved_position_gives_the_batches_that_followed():
    with Prefetch(Counting(), depth=3) as ahead:
        _ids(ahead, 3)
        saved = ahead.get_state()
        following = _ids(ahead, 4)
    resumed = Prefetch(Counting(), depth=3)
    resumed.set_state(saved)
    assert resumed.get_state() == saved
    assert _ids(resumed, 4) == following
    resumed.close()


def test_close_then_iterate_on_loses_no_batch():
    reference = _ids(Counting(), 6)
    ahead = Prefetch(Counting(), depth=2)
    first = _ids(ahead, 2)
    ahead.close()            # drops what it built ahead, rewinds the inner iterator
    assert first + _ids(ahead, 4) == reference
    ahead.close()


def test_an_error_comes_after_the_batches_before_it_and_the_thread_ends():
    source = Counting(fail_at=3)
    ahead = Prefetch(source, depth=2)
    got = _ids(ahead, 3)
    assert len(got) == 3
    with pytest.raises(ValueError, match="bad media in batch 3"):
        next(ahead)
    assert ahead.get_state() == {"epoch": 0, "position": 6}   # the batch that failed is redone
    assert ahead._thread is None
    with pytest.raises(StopIteration):
        next(ahead)


def test_one_pass_ends_and_the_thread_stops():
    with Prefetch(Counting(n=5, batch=2, repeat=False)) as ahead:
        batches = list(ahead)
    assert [b["example_id"].size for b in batches] == [2, 2, 2]
    assert not [t for t in threading.enumerate() if t.name == "vsalmonn-prefetch"]


def test_close_stops_a_thread_blocked_on_a_full_queue():
    ahead = Prefetch(Counting(), depth=1)
    next(ahead)
    thread = ahead._thread
    assert _wait_for(lambda: ahead._queue.full())
    ahead.close()
    assert not thread.is_alive()
