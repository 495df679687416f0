"""A corrupt latest checkpoint (truncated OCDBT data file, empty meta/metadata): restore falls back to
the previous one, says which and why, and sets the bad one aside; none readable -> a clear error."""

import numpy as np
import pytest

from vsalmonn_jax.training.checkpoint import Checkpointer, CheckpointError
from vsalmonn_jax.training.state import TrainState


def _state(step, value):
    return TrainState(step=np.int32(step), params={}, trainable={"w": np.full(4, value, np.float32)},
                      opt_state={"m": np.zeros(4, np.float32)}, rng=np.zeros(2, np.uint32),
                      ref_adapter={})


@pytest.fixture
def two_checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(_state(2, 2.0), {"at": 2})
    ckpt.save(_state(4, 4.0), {"at": 4})
    ckpt.close()
    return directory


def _truncate_data(step_dir):
    files = [f for f in (step_dir / "state").rglob("d/*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[:10])


def _empty_metadata(step_dir):
    (step_dir / "meta" / "metadata").write_text("")


# a failed orbax restore can leave a tensorstore callback for an event loop that is closed later
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt, why", [(_truncate_data, "OUT_OF_RANGE"),
                                          (_empty_metadata, "JSONDecodeError")])
def test_corrupt_latest_falls_back_to_the_previous(two_checkpoints, capfd, corrupt, why):
    corrupt(two_checkpoints / "4")
    ckpt = Checkpointer(two_checkpoints, async_save=False)
    state, meta = ckpt.restore(_state(0, 0.0))
    assert int(state.step) == 2 and meta == {"at": 2}
    np.testing.assert_array_equal(state.trainable["w"], np.full(4, 2.0, np.float32))
    err = capfd.readouterr().err
    assert f"restored step 2 ({two_checkpoints}/2) instead of unreadable step 4" in err and why in err
    assert (two_checkpoints.parent / "checkpoints.corrupt" / "4").is_dir()
    assert ckpt.all_steps() == [2]
    ckpt.save(_state(4, 5.0), {"at": 4})   # the resumed run saves step 4 again
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_no_readable_checkpoint_names_the_folder(two_checkpoints):
    _empty_metadata(two_checkpoints / "4")
    _truncate_data(two_checkpoints / "2")
    ckpt = Checkpointer(two_checkpoints, async_save=False)
    with pytest.raises(CheckpointError, match=f"no readable checkpoint in {two_checkpoints}: "
                                              "step 4: JSONDecodeError.*; step 2: ValueError"):
        ckpt.restore(_state(0, 0.0))
    ckpt.close()


def test_reading_a_missing_folder_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        Checkpointer(tmp_path / "typo" / "checkpoints", create=False)
    assert not (tmp_path / "typo").exists()


def test_whether_the_base_is_saved_is_read_past_an_unreadable_newest(tmp_path):
    """holds_base (DPO resume, --init-from a DPO run) read the newest step's metadata first: an
    empty state metadata raised JSONDecodeError there, before the restore that skips such a step."""
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, async_save=False, include_params=True)
    for step in (2, 4):
        ckpt.save(_state(step, float(step)).replace(params={"b": np.ones(2, np.float32)}), {"at": step})
    ckpt.close()
    (directory / "4" / "state" / "_METADATA").write_text("")
    reader = Checkpointer(directory, create=False)
    assert reader.holds_base()            # from step 2
    reader.close()
    plain = Checkpointer(tmp_path / "plain", async_save=False)
    plain.save(_state(2, 2.0), {"at": 2})
    assert not plain.holds_base()
    plain.close()
