"""Multi-host runs: detect the cluster (TPU VM, SLURM, explicit env), start `jax.distributed`,
build global arrays from per-process batches, gather for export, shared checkpoint dirs, agreed stops.

`python -m vsalmonn_jax.distributed COMMAND ARGS...` initialises the distributed runtime and then runs
`vsalmonn-jax COMMAND ARGS...` in the same process (what launch/tpu_pod.sh and the SLURM job start).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vsalmonn_jax.slurm import slurm_coordinator, slurm_local_device_ids
from vsalmonn_jax.training.sharding import batch_sharding

CLUSTER_KINDS = ("auto", "single", "explicit", "slurm", "tpu")

# Environment markers of a Cloud TPU VM worker (any one is enough; /dev/accel0 is the TPU chip).
_TPU_ENV_MARKERS = ("TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE",
                    "CLOUD_TPU_TASK_ID")
_TPU_DEVICE_PATHS = ("/dev/accel0", "/dev/vfio/0")
_SLURM_REQUIRED = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How this process joins the run. `local_device_ids=None` = every local device is used."""

    kind: str                      # single | explicit | slurm | tpu
    num_processes: int = 1
    process_id: int = 0
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def is_multiprocess(self) -> bool:
        return self.num_processes > 1 or self.kind == "tpu"


# ---------------------------------------------------------------- detection (pure, env in, spec out)

def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as err:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from err


def _device_ids(text: str, key: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ValueError(f"{key}={text!r} must be comma-separated integers") from err


def detect_cluster(env: Mapping[str, str] | None = None,
                   path_exists: Callable[[str], bool] = os.path.exists) -> ClusterSpec:
    """Decide how to join the run from the environment (VSALMONN_CLUSTER forces a kind).

    Order for `auto`: explicit JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, then
    SLURM (SLURM_JOB_ID with SLURM_NTASKS > 1), then a Cloud TPU VM, else a single process.
    """
    env = os.environ if env is None else env
    kind = env.get("VSALMONN_CLUSTER", "auto").lower()
    if kind not in CLUSTER_KINDS:
        raise ValueError(f"VSALMONN_CLUSTER={kind!r}: expected one of {', '.join(CLUSTER_KINDS)}")
    local_ids = (_device_ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
                 if env.get("JAX_LOCAL_DEVICE_IDS") else None)
    explicit_keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if kind == "auto":
        if any(k in env for k in explicit_keys):
            kind = "explicit"
        elif all(k in env for k in _SLURM_REQUIRED) and int(env.get("SLURM_NTASKS", "1")) > 1:
            kind = "slurm"
        elif any(k in env for k in _TPU_ENV_MARKERS) or any(map(path_exists, _TPU_DEVICE_PATHS)):
            kind = "tpu"
        else:
            kind = "single"
    if kind == "single":
        return ClusterSpec("single", local_device_ids=local_ids)
    if kind == "explicit":
        missing = [k for k in explicit_keys if k not in env]
        if missing:
            raise ValueError(f"explicit multi-process run needs {', '.join(explicit_keys)}; "
                             f"missing {', '.join(missing)}")
        spec = ClusterSpec("explicit", _int_env(env, "JAX_NUM_PROCESSES"),
                           _int_env(env, "JAX_PROCESS_ID"), env["JAX_COORDINATOR_ADDRESS"], local_ids)
    elif kind == "slurm":
        missing = [k for k in _SLURM_REQUIRED if k not in env]
        if missing:
            raise ValueError(f"SLURM run is missing {', '.join(missing)} (start each task with srun)")
        spec = ClusterSpec("slurm", _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID"),
                           env.get("JAX_COORDINATOR_ADDRESS") or slurm_coordinator(env),
                           local_ids if local_ids is not None else slurm_local_device_ids(env))
    else:  # tpu: jax reads worker ids and the coordinator from the TPU metadata server
        return ClusterSpec("tpu", num_processes=0, process_id=-1)
    if not 0 <= spec.process_id < spec.num_processes:
        raise ValueError(f"process id {spec.process_id} outside [0, {spec.num_processes}) "
                         f"({spec.kind} cluster)")
    if ":" not in spec.coordinator_address:
        raise ValueError(f"coordinator address {spec.coordinator_address!r} needs host:port")
    return spec


def initialize(spec: ClusterSpec | None = None, timeout_s: int = 300) -> ClusterSpec:
    """Start `jax.distributed` for `spec` (default: `detect_cluster()`); a no-op for single runs.

    Must run before any other jax call that touches devices.
    """
    spec = detect_cluster() if spec is None else spec
    if spec.kind == "single":
        if spec.local_device_ids is not None:
            visible = ",".join(map(str, spec.local_device_ids))
            jax.config.update("jax_cuda_visible_devices", visible)
        return spec
    if spec.kind == "tpu":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return dataclasses.replace(spec, num_processes=jax.process_count(),
                                   process_id=jax.process_index())
    # everything is known: jax's own cluster detection would fill local_device_ids=None with
    # [SLURM_LOCALID] (one GPU per node with one task per node) instead of every visible device
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=list(spec.local_device_ids) if spec.local_device_ids is not None else None,
            cluster_detection_method="deactivate", initialization_timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - jax raises XlaRuntimeError / RuntimeError kinds
        raise RuntimeError(f"jax.distributed could not start process {spec.process_id} of "
                           f"{spec.num_processes} ({spec.kind}, coordinator {spec.coordinator_address}) "
                           f"within {timeout_s} s: {err}{_start_hint(spec)}") from err
    return spec


def _start_hint(spec: ClusterSpec) -> str:
    """Why the other processes may never have come: a SLURM 'run' started outside srun (a batch
    shell holds the allocation's SLURM_NTASKS but is one process)."""
    if spec.kind == "slurm" and not (os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID")):
        return ("; SLURM_STEP_ID is not set: this process was not started by srun, so no other "
                "task exists. Start one task per process with srun (launch/slurm_gpu.sbatch does), "
                "or set VSALMONN_CLUSTER=single for one process")
    return ("; check that every process was started with the same coordinator and process count, "
            "and that the coordinator's host and port are reachable")


def is_primary() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- data: per-process batches

def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over data x fsdp (a common trap)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards:
        raise ValueError(f"global batch {global_batch} does not divide data x fsdp = "
                         f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}; use a multiple of "
                         f"{shards} (e.g. {shards * max(1, -(-global_batch // shards))})")


def process_batch_rows(global_batch: int, mesh: Mesh) -> tuple[int, int]:
    """Rows [start, stop) of the global batch that this process loads (contiguous by mesh order)."""
    check_global_batch(global_batch, mesh)
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values()})
    start, stop = starts[0][0], starts[-1][1]
    if sum(b - a for a, b in starts) != stop - start:
        raise ValueError(f"this process's batch rows {starts} are not contiguous on mesh {mesh.shape}")
    return start, stop


def batch_shard(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process loads part `index` of `count` equal, contiguous parts of every
    global batch (its data loader's shard). count = the process count when each process's devices
    hold rows of their own; fewer when `tensor` / `context` span processes (e.g. one process per
    GPU with data=1 fsdp=2 tensor=4: 8 processes, 2 parts): processes whose devices hold the same
    rows share an index and load the same records."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    start, stop = process_batch_rows(shards, mesh)   # one row per (data x fsdp) shard
    rows = stop - start
    if start % rows or shards % rows:
        raise ValueError(f"this process holds batch shards [{start}, {stop}) of {shards} on mesh "
                         f"{dict(mesh.shape)}: not one of equal parts; order the devices by process")
    return start // rows, shards // rows


def local_batch_shards(mesh: Mesh) -> int:
    """How many (data x fsdp) batch shards this process's devices hold (1 when a shard spans
    processes): its rows of a global batch are this many shards' rows."""
    return mesh.shape["data"] * mesh.shape["fsdp"] // batch_shard(mesh)[1]


def global_batch(local_batch: Any, mesh: Mesh, global_size: int | None = None) -> Any:
    """Per-process batch tree (numpy, leading axis = this process's rows) -> global jax.Arrays
    sharded on their batch axis over (data, fsdp)."""
    def one(x):
        x = np.asarray(x)
        size = global_size or x.shape[0] * batch_shard(mesh)[1]
        check_global_batch(size, mesh)
        start, stop = process_batch_rows(size, mesh)
        if x.shape[0] != stop - start:
            raise ValueError(f"local batch has {x.shape[0]} rows, this process owns rows "
                             f"[{start}, {stop}) of a global batch of {size}")
        return jax.make_array_from_process_local_data(
            batch_sharding(mesh, x.ndim), x, (size,) + x.shape[1:])
    return jax.tree.map(one, local_batch)


def to_host(tree: Any) -> Any:
    """Global (possibly multi-host sharded) arrays -> full numpy arrays on every process."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def export_on_primary(write: Callable[[Any], None], tree: Any, name: str = "export") -> None:
    """Gather `tree` to host numpy on every process, call `write(tree)` on process 0, then wait.

    E.g. `export_on_primary(lambda p: save_hf(p, cfg, out), merge(params, lora, scale))`.
    """
    host = to_host(tree)
    if is_primary():
        write(host)
    barrier(f"vsalmonn_{name}_done")


# ---------------------------------------------------------------- multi-host checkpoints

# Saving and restoring is training/checkpoint.py's Checkpointer (orbax; every process writes its own
# shards, restores take ShapeDtypeStruct targets so any topology resumes any checkpoint). What more
# than one host adds is here: the directory must be shared, and stopping must be agreed.

def ensure_shared_directory(directory: str | os.PathLike) -> None:
    """Fail early (not at the first save) when processes do not see the same checkpoint directory.

    Each process writes a marker, all wait, each checks every marker: a local disk per host fails
    with a message naming the missing process. gs:// and other URLs are taken as shared.
    """
    directory = str(directory)
    if "://" in directory or jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    # this check's own token (from process 0): a marker an earlier run left behind does not count
    token = str(int(multihost_utils.broadcast_one_to_all(
        np.asarray(int.from_bytes(os.urandom(4), "big") >> 1, np.int32))))
    path = pathlib.Path(directory).resolve() / ".vsalmonn_hosts"
    path.mkdir(parents=True, exist_ok=True)
    (path / f"process_{jax.process_index()}").write_text(f"{token} {os.uname().nodename}")

    def seen(i: int) -> bool:
        marker = path / f"process_{i}"
        return marker.exists() and marker.read_text().split(" ")[0] == token

    barrier("vsalmonn_shared_dir_written")
    missing = [i for i in range(jax.process_count()) if not seen(i)]
    barrier("vsalmonn_shared_dir_checked")
    if missing:
        raise RuntimeError(
            f"checkpoint directory {directory} is not shared between hosts: process "
            f"{jax.process_index()} on {os.uname().nodename} cannot see the marker of process(es) "
            f"{missing}; use a file system every host mounts at one path (NFS, Filestore, a "
            "gcsfuse-mounted bucket)")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. SIGTERM seen by one host).

    A preemption save is a collective: if only the signalled host saved, the others would hang.
    Call it at the same step on every process; one tiny all-gather.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.any(flags))


def gather_json(value: Any) -> list[Any]:
    """Every process's JSON-able `value`, in process order, on every process (one process: [value]).

    Two all-gathers (the encoded lengths, then the bytes padded to the longest); call it at the same
    point on every process, e.g. to checkpoint each host's data-iterator position.
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    mine = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([mine.size], np.int32))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:mine.size] = mine
    table = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n])) for row, n in zip(table, lengths, strict=True)]


def primary_value(value: Any) -> Any:
    """Process 0's JSON-able `value` on every process (e.g. a checkpoint listing: a lagging network
    file system could show the hosts different steps, and they must restore the same one)."""
    return gather_json(value)[0]


# ---------------------------------------------------------------- entry point

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    spec = initialize()
    from vsalmonn_jax import compile_cache

    if compile_cache.off_for_multiprocess_cpu():
        print("[vsalmonn-jax] CPU devices in several processes: the compile cache is off (runs with "
              "cached executables hung in their collectives)", flush=True)
    print(f"[vsalmonn-jax] {spec.kind} cluster: process {jax.process_index()}/{jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    from vsalmonn_jax import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
