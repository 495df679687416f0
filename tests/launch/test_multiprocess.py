"""Two processes on 127.0.0.1 (4 fake CPU devices each) vs one process with 8: same SFT/DPO results
and stored reference log-probs, a two-process checkpoint restores in one process, a two-process
merged export loads back whole; two processes with context parallelism (data=1, fsdp=1, context=2,
tensor=4: both processes hold the one batch shard) give the same results.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import fake_devices
import numpy as np
import pytest
from machine import scaled

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
WORKER = HERE / "mp_worker.py"
TIMEOUT_S = 600

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launch_multiprocess")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = fake_devices.env(devices, {k: v for k, v in os.environ.items()
                                     if not k.startswith(("JAX_", "SLURM_", "TPU_"))})
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
    return env


def _check(procs, logs):
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        try:
            proc.wait(timeout=scaled(TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        log.seek(0)
        text = log.read()
        assert proc.returncode == 0, f"worker {i} failed (rc {proc.returncode}):\n{text[-4000:]}"


def _two_processes(root: pathlib.Path, name: str, *args: str) -> dict:
    """Run mp_worker.py as 2 processes x 4 devices into root / name; its results.npz."""
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        log = open(root / f"{name}_{pid}.log", "w+")
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root / name), *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, cwd=root))
        logs.append(log)
    _check(procs, logs)
    return dict(np.load(root / name / "results.npz"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    two = _two_processes(root, "two")
    log = open(root / "one.log", "w+")
    one = subprocess.Popen([sys.executable, str(WORKER), str(root / "one"),
                            "--restore-from", str(root / "two" / "ckpt"),
                            "--export-from", str(root / "two" / "export")],
                           env=_env(8), stdout=log, stderr=subprocess.STDOUT, cwd=root)
    _check([one], [log])
    single = dict(np.load(root / "one" / "results.npz"))
    return root, two, single


def test_process_counts_and_files(runs):
    root, two, single = runs
    assert int(two["process_count"]) == 2 and int(single["process_count"]) == 1
    assert bool(two["stop"]) and bool(single["stop"])  # one process's stop reached every process
    # each process wrote its own shard folder into the shared checkpoint directory
    step_dirs = [p for p in (root / "two" / "ckpt").iterdir() if p.name.isdigit()]
    assert [p.name for p in step_dirs] == ["5"]
    shards = sorted(p.name for p in (step_dirs[0] / "state").glob("ocdbt.process_*"))
    assert shards == ["ocdbt.process_0", "ocdbt.process_1"]
    assert (root / "two" / "export" / "model.safetensors").is_file()
    assert (root / "two" / "export" / "config.json").is_file()


def test_host_side_av_work_runs_on_every_process(runs):
    """A frame resize on every process (it used process 0's CPU device: the other processes' media
    decoding raised) and the reference snapshot of an adapter split over both processes (a host
    copy raised there: DPO / mrDPO stages on fsdp spanning hosts)."""
    _, two, single = runs
    np.testing.assert_array_equal(two["resized"].reshape(2, -1), [[7] * 12, [14] * 12])
    assert two["adapter_sharding"].tolist() == [2, 0]          # split over both processes
    np.testing.assert_array_equal(two["ref_adapter"], np.arange(32).reshape(8, 4))
    np.testing.assert_array_equal(single["ref_adapter"], two["ref_adapter"])


def test_sft_and_dpo_losses_equal(runs):
    _, two, single = runs
    assert two["losses"].shape == (5,)  # 3 SFT + 2 DPO steps
    np.testing.assert_allclose(two["losses"], single["losses"], rtol=1e-6, atol=1e-6)
    assert single["losses"][0] > 5.0 and single["losses"][3] < 2.0  # CE ~ log(512); DPO ~ log 2 + CE


def test_reference_logps_equal_and_written_once(runs):
    root, two, single = runs
    files = [[json.loads(line) for line in open(root / run / "reference.jsonl")]
             for run in ("two", "one")]
    assert [r["index"] for r in files[0]] == list(range(12)) == [r["index"] for r in files[1]]
    assert not list((root / "two").glob("reference.jsonl.tmp"))
    for field in ("ref_chosen_logps", "ref_rejected_logps"):
        got, want = ([r[field] for r in rows] for rows in files)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=field)
        assert max(got) < -1.0   # summed log-probs of random responses under a random model
    np.testing.assert_allclose(two["reference"], single["reference"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(two["reference"][:, 0], [r["ref_chosen_logps"] for r in files[0]])


def test_trainables_and_optimizer_equal(runs):
    _, two, single = runs
    keys = [k for k in two if k.startswith(("['trainable']", "['opt_state']"))]
    assert any("q_proj']['a']" in k for k in keys) and any(".mu[" in k for k in keys)
    for key in keys:
        np.testing.assert_allclose(two[key], single[key], rtol=1e-4, atol=2e-5, err_msg=key)
    # training moved B away from its zero init in both runs
    b = "['trainable']['lora']['layers']['self_attn']['v_proj']['b']"
    assert np.abs(two[b]).max() > 1e-3


def test_two_process_checkpoint_restores_in_one_process(runs):
    _, two, single = runs
    restored = [k for k in single if k.startswith("restored")]
    assert len(restored) > 10
    for key in restored:
        own = key[len("restored"):]
        if own in two:  # trainables and optimizer state: bit-exact against what the writers held
            np.testing.assert_array_equal(single[key], two[own], err_msg=key)
    assert int(single["restored['step']"]) == 5


def test_each_process_resumes_its_own_data_position(runs):
    """orbax writes a checkpoint's JSON item on process 0 only: every process's data-iterator state
    is gathered into it, each restores its own; one process restoring two's takes process 0's, and
    says the positions cannot carry over."""
    root, two, single = runs
    assert two["own_data"].tolist() == [0, 1] and single["own_data"].tolist() == [0]
    assert int(single["data_restored"]) == 0
    assert "saved by 2 processes and this run has 1" in (root / "one.log").read_text()


def test_processes_restore_the_step_process_0_lists(runs):
    """A process whose listing lags (the newest step not yet visible) restores process 0's step."""
    _, two, single = runs
    assert two["lagging_step"].tolist() == [6, 6] and single["lagging_step"].tolist() == [6]


def test_two_process_merged_export_holds_base_and_loads(runs):
    _, two, single = runs
    loaded = {k[len("loaded"):]: v for k, v in single.items() if k.startswith("loaded")}
    merged = {k[len("['merged']"):]: v for k, v in two.items() if k.startswith("['merged']")}
    assert set(loaded) == set(merged)
    assert "['embed_tokens']['embedding']" in loaded and "['lm_head']['kernel']" in loaded
    for key, value in merged.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        base = single.get("['params']" + key)
        assert base is not None, key
        if any(f"{t}']['kernel']" in key for t in ("q_proj", "k_proj", "v_proj")):
            assert np.abs(value - base).max() > 1e-4, f"{key}: LoRA not merged"
        else:
            np.testing.assert_array_equal(value, base, err_msg=key)  # untouched base weights


CONTEXT_MESH = "data=1,fsdp=1,context=2,tensor=4"


def test_two_processes_with_context_parallelism_equal_one_process(runs, tmp_path):
    """2 processes x 4 devices, each sequence split over context = 2 (with tensor): the same SFT /
    DPO losses and trained weights as one process x 8 devices on that mesh, and the same losses as
    without context parallelism (weights to Adam's amplification of summation order).

    context x tensor span both processes, so they hold one data x fsdp batch shard together (as one
    process per GPU on an 8-GPU node with data=1 fsdp=2 tensor=4: 8 processes, 2 shards): each
    loads the whole shard's rows (loader shard 0 of 1; the train CLI's local batch = the global
    one). This divided by zero (data x fsdp // process count) before distributed.batch_shard."""
    _, two, single = runs
    context = _two_processes(tmp_path, "two", "--mesh", CONTEXT_MESH)
    # per process: batch_shard (index, count), local_batch_shards, train's local batch, loader shard
    np.testing.assert_array_equal(context["shards"], [[0, 1, 1, 8, 0, 1]] * 2)
    np.testing.assert_array_equal(two["shards"], [[0, 2, 2, 4, 0, 2], [1, 2, 2, 4, 1, 2]])
    np.testing.assert_array_equal(single["shards"], [[0, 1, 4, 8, 0, 1]])
    # sharing the shard, the processes check that they loaded the same rows: a different example id
    # on one (a record it skipped) stops both; processes holding shards of their own do not check
    assert context["mismatch_raised"].tolist() == [1, 1]
    assert "processes [0, 1] share batch shard 0 but loaded different rows" in str(context["mismatch"])
    assert two["mismatch_raised"].tolist() == [0, 0] and single["mismatch_raised"].tolist() == [0]
    # batches of different shapes (each host buckets its own examples): padded to the largest, the
    # same loss (they compiled different programs and crashed at the first collective before); a
    # field only one process has stops both, naming process 0's fields
    for run in (two, context):
        np.testing.assert_allclose(run["padded_loss"][1], run["padded_loss"][0], rtol=1e-6)
        assert "the processes built batches with different fields (this process 0: " in str(run["fields"])
        assert "input_ids [" in str(run["fields"])
    np.testing.assert_allclose(two["padded_loss"], single["padded_loss"], rtol=1e-6)
    # a folder per process with an earlier run's markers is still found not shared (process 0's
    # message names process 1); one process never checks
    for run in (two, context):
        assert "is not shared between hosts" in str(run["not_shared"]) and "[1]" in str(run["not_shared"])
    assert str(single["not_shared"]) == ""
    # a data error on process 1 (training: its iterator raised; evaluation: its val stream did; a
    # prefix-shared pair with two prompts): process 0 stops at the same point (DataErrorElsewhere),
    # process 1 with its own error
    for run in (two, context):
        assert run["data_errors"].tolist() == [[1, 1, 1], [1, 1, 1]]
    # time tokens in one process's batch only: filled in (all False) on the other, 4 frames on both
    for run in (two, context):
        assert run["time_fill"].tolist() == [[2, 4, 8, 0, 2, 4], [2, 4, 8, 64, 2, 4]]
    assert str(single["fields"]) == ""
    # evaluation over uneven per-process streams: one more batch on shard 0 (the other process fills
    # in rows with no target; it waited forever before), the loss of every row once
    np.testing.assert_allclose(two["eval_loss"], single["eval_loss"], rtol=1e-6)
    np.testing.assert_allclose(context["eval_loss"], single["eval_loss"], rtol=1e-5)
    log = open(tmp_path / "one.log", "w+")
    one = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "one"), "--mesh", CONTEXT_MESH],
                           env=_env(8), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    _check([one], [log])
    one = dict(np.load(tmp_path / "one" / "results.npz"))
    assert int(context["process_count"]) == 2 and int(one["process_count"]) == 1
    np.testing.assert_allclose(context["losses"], one["losses"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(context["losses"], single["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(context["reference"], one["reference"], rtol=0, atol=1e-5)
    keys = [k for k in single if k.startswith(("['trainable']", "['opt_state']"))]
    assert len(keys) > 10
    for key in keys:
        np.testing.assert_allclose(context[key], one[key], rtol=1e-4, atol=2e-5, err_msg=key)
        np.testing.assert_allclose(context[key], single[key], rtol=1e-2, atol=1e-4, err_msg=key)

