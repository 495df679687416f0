"""Cluster detection from the environment (explicit, SLURM, TPU VM) and per-process batch rows."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from machine import scaled

from vsalmonn_jax import distributed, slurm
from vsalmonn_jax.training.sharding import make_mesh

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_NTASKS_PER_NODE": "8"}


def no_tpu(_path):
    return False


def test_expand_hostlist():
    assert slurm.expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7",
                                                                  "login1"]
    assert slurm.expand_hostlist("node001") == ["node001"]
    assert slurm.expand_hostlist("a[9-10]-ib") == ["a9-ib", "a10-ib"]
    with pytest.raises(ValueError, match="cannot parse SLURM nodelist"):
        slurm.expand_hostlist("gpu[a-b]")


def test_single_process_by_default():
    spec = distributed.detect_cluster({}, no_tpu)
    assert spec == distributed.ClusterSpec("single")
    assert not spec.is_multiprocess


def test_explicit_env():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    spec = distributed.detect_cluster(env, no_tpu)
    assert spec == distributed.ClusterSpec("explicit", 4, 3, "10.0.0.2:1234", (0, 1))
    with pytest.raises(ValueError, match="missing JAX_PROCESS_ID"):
        distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, no_tpu)
    with pytest.raises(ValueError, match=r"process id 2 outside \[0, 2\)"):
        distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": "2"}, no_tpu)
    with pytest.raises(ValueError, match="needs host:port"):
        distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2",
                                    "JAX_PROCESS_ID": "0"}, no_tpu)
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                                    "JAX_PROCESS_ID": "0"}, no_tpu)


def test_slurm_one_process_per_gpu_all_gpus_visible():
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    spec = distributed.detect_cluster(env, no_tpu)
    assert spec.kind == "slurm" and spec.num_processes == 16 and spec.process_id == 9
    assert spec.coordinator_address == f"gpu007:{61440 + 4242 % 4096}"
    assert spec.local_device_ids == (1,)  # this task's GPU


def test_slurm_gpus_per_task_binding():
    # --gpus-per-task=1: the task sees one GPU (index 0 inside the process), whatever its number
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="5")
    assert distributed.detect_cluster(env, no_tpu).local_device_ids == (0,)


def test_slurm_one_process_per_node_sees_every_gpu():
    # the known trap: jax's own SLURM detection would give [SLURM_LOCALID] = [0], i.e. one GPU
    env = dict(SLURM, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
               SLURM_NTASKS_PER_NODE="1", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    spec = distributed.detect_cluster(env, no_tpu)
    assert spec.local_device_ids == tuple(range(8))
    assert spec.num_processes == 2 and spec.process_id == 1


def test_slurm_gpus_per_task_above_one_and_uneven_layouts():
    """--gpus-per-task=2 binds each task to its own 2 GPUs (CUDA_VISIBLE_DEVICES lists only them):
    task 1 got (1,), half its GPUs idle. An uneven step layout ('2(x3),1') gave the last node's
    single task one of its 2 GPUs; '1,2' gave both tasks of node 2 the same two GPUs."""
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="2,3", SLURM_LOCALID="1", SLURM_GPUS_PER_TASK="2")
    assert distributed.detect_cluster(env, no_tpu).local_device_ids == (0, 1)
    # --gpus-per-task=1 under the sbatch's --gpu-bind=none: every task sees the node's 8 GPUs
    unbound = dict(SLURM, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_GPUS_PER_TASK="1")
    assert distributed.detect_cluster(unbound, no_tpu).local_device_ids == (1,)
    uneven = dict(SLURM, CUDA_VISIBLE_DEVICES="0,1", SLURM_STEP_TASKS_PER_NODE="2(x3),1",
                  SLURM_NODEID="3", SLURM_LOCALID="0", SLURM_NTASKS="7", SLURM_PROCID="6")
    del uneven["SLURM_NTASKS_PER_NODE"]
    assert distributed.detect_cluster(uneven, no_tpu).local_device_ids == (0, 1)
    pair = dict(uneven, SLURM_STEP_TASKS_PER_NODE="1,2", SLURM_NODEID="1", SLURM_LOCALID="1",
                SLURM_NTASKS="3", SLURM_PROCID="2")
    assert distributed.detect_cluster(pair, no_tpu).local_device_ids == (1,)
    # the step's own layout wins over a job-level SLURM_NTASKS_PER_NODE (an srun input)
    stale = dict(pair, SLURM_NTASKS_PER_NODE="8")
    assert distributed.detect_cluster(stale, no_tpu).local_device_ids == (1,)


def test_initialize_keeps_jax_from_guessing_the_devices(monkeypatch):
    """With every parameter known, jax.distributed's own SLURM detection still filled
    local_device_ids=None with [SLURM_LOCALID]: one GPU per node with one task per node."""
    import jax

    seen = {}
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    spec = distributed.ClusterSpec("slurm", 2, 1, "gpu01:61440", None)
    distributed.initialize(spec)
    assert seen["cluster_detection_method"] == "deactivate" and seen["local_device_ids"] is None


def test_slurm_tasks_per_node_from_list_and_errors():
    env = dict(SLURM, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", SLURM_LOCALID="1")
    del env["SLURM_NTASKS_PER_NODE"]
    env["SLURM_STEP_TASKS_PER_NODE"] = "4(x4)"
    assert distributed.detect_cluster(env, no_tpu).local_device_ids == (2, 3)
    env["SLURM_STEP_TASKS_PER_NODE"] = "3(x4)"
    with pytest.raises(ValueError, match="lists 8 GPUs for 3 tasks"):
        distributed.detect_cluster(env, no_tpu)
    env = dict(SLURM, JAX_COORDINATOR_PORT="5555")
    del env["SLURM_STEP_NODELIST"]
    env["SLURM_JOB_NODELIST"] = "h1,h2"
    assert distributed.detect_cluster(env, no_tpu).coordinator_address == "h1:5555"


def test_slurm_single_task_is_single_and_forced_kind_validates():
    env = dict(SLURM, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")
    assert distributed.detect_cluster(env, no_tpu).kind == "single"
    with pytest.raises(ValueError, match="SLURM run is missing SLURM_JOB_ID"):
        distributed.detect_cluster({"VSALMONN_CLUSTER": "slurm", "SLURM_NTASKS": "2",
                                    "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, no_tpu)
    with pytest.raises(ValueError, match="VSALMONN_CLUSTER='mpi'"):
        distributed.detect_cluster({"VSALMONN_CLUSTER": "mpi"}, no_tpu)


def test_tpu_vm_detection():
    assert distributed.detect_cluster({"TPU_WORKER_ID": "3"}, no_tpu).kind == "tpu"
    assert distributed.detect_cluster({}, lambda p: p == "/dev/accel0").kind == "tpu"
    assert distributed.detect_cluster({"VSALMONN_CLUSTER": "tpu"}, no_tpu).is_multiprocess


def test_process_batch_rows_and_global_batch():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert distributed.process_batch_rows(8, mesh) == (0, 8)  # one process holds every row
    with pytest.raises(ValueError, match=r"global batch 6 does not divide data x fsdp = 2 x 2 = 4"):
        distributed.process_batch_rows(6, mesh)
    x = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    g = distributed.global_batch({"ids": x}, mesh)["ids"]
    assert g.shape == (8, 3) and g.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(distributed.to_host(g), x)
    with pytest.raises(ValueError, match=r"local batch has 8 rows, this process owns rows \[0, 12\)"):
        distributed.global_batch({"ids": x}, mesh, global_size=12)
    assert jax.process_count() == 1 and distributed.is_primary()


def test_entry_point_initialises_then_dispatches():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(VSALMONN_CLUSTER="single", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "vsalmonn_jax.distributed", "--help"], env=env,
                          capture_output=True, text=True, timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    assert "[vsalmonn-jax] single cluster: process 0/1" in proc.stdout
    assert "usage: vsalmonn-jax COMMAND" in proc.stdout


def test_a_start_that_fails_says_why_for_a_batch_shell(monkeypatch):
    """`python -m vsalmonn_jax.distributed` in an sbatch shell (no srun) looks like a 16-process
    SLURM run: jax waited its timeout and failed without a word on srun."""
    def fail(**kw):
        raise RuntimeError("DEADLINE_EXCEEDED: Barrier timed out")

    monkeypatch.setattr(jax.distributed, "initialize", fail)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("SLURM_STEPID", raising=False)
    spec = distributed.ClusterSpec("slurm", 16, 0, "gpu01:61440", None)
    with pytest.raises(RuntimeError, match=r"(?s)process 0 of 16 .*DEADLINE_EXCEEDED.*not started by srun"):
        distributed.initialize(spec, timeout_s=5)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(RuntimeError, match="coordinator's host and port are reachable"):
        distributed.initialize(spec, timeout_s=5)
