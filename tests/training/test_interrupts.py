"""SIGTERM / SIGINT handling of the training loop (training/interrupts.py): the first signal asks for
a save-and-stop (a data wait is cut short), a second Ctrl-C aborts at once; handlers come back."""

import signal

import pytest

from vsalmonn_jax.training.interrupts import Interrupted, stop_signals


def test_first_sigint_asks_to_stop_second_aborts(capsys):
    before = signal.getsignal(signal.SIGINT)
    with stop_signals() as stop:
        assert not stop.is_set()
        signal.raise_signal(signal.SIGINT)
        assert stop.is_set() and stop.name == "SIGINT"
        assert "press Ctrl-C again to abort" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_signal_during_a_data_wait_cuts_it_short():
    with stop_signals() as stop:
        with pytest.raises(Interrupted, match="SIGTERM"):
            with stop.waiting():
                signal.raise_signal(signal.SIGTERM)   # stands for a wait that never returns
        assert stop.is_set()
        with pytest.raises(Interrupted):   # already asked to stop: no new wait starts
            with stop.waiting():
                pass
        with stop.waiting(enabled=False):  # several hosts: stop at the step boundary instead
            pass
