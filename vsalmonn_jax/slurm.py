"""SLURM's view of a multi-process run, read from the environment of one srun task: the step's
hosts, this task's GPUs and the coordinator address (vsalmonn_jax/distributed.py joins the run).
"""

from __future__ import annotations

import re
from collections.abc import Mapping


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM nodelist: `gpu[01-03,7],login1` -> [gpu01, gpu02, gpu03, gpu7, login1]."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot parse SLURM nodelist {nodelist!r} (range {part!r})")
            for number in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{number:0{len(lo)}d}{suffix}")
    if not hosts:
        raise ValueError(f"empty SLURM nodelist {nodelist!r}")
    return hosts


def _tasks_per_node(env: Mapping[str, str]) -> int | None:
    """Processes on this node: this node's entry (SLURM_NODEID) of the step's `2(x3),1`-style
    SLURM_STEP_TASKS_PER_NODE (else the job's SLURM_TASKS_PER_NODE), else SLURM_NTASKS_PER_NODE
    (an srun input: it may be the allocation's, not this step's)."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        counts: list[int] = []
        for part in filter(None, env.get(key, "").split(",")):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                counts = []
                break
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        if counts:
            node = int(env.get("SLURM_NODEID", "0") or 0)
            return counts[node] if 0 <= node < len(counts) else counts[0]
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    return None


def slurm_local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    """GPUs this SLURM task drives, as indices into the devices the process can see.

    jax's own SLURM detection uses `[SLURM_LOCALID]`, which is wrong twice over: with one process per
    node it leaves a single GPU visible, and with `--gpus-per-task=1` (CUDA_VISIBLE_DEVICES=3) index
    3 does not exist inside the process. The answer depends on CUDA_VISIBLE_DEVICES:
    one visible GPU -> [0]; one task on the node -> all visible; as many visible as tasks on the
    node -> [SLURM_LOCALID]; a multiple -> this task's contiguous slice.
    """
    visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return None  # no GPU restriction known: every local device (jax's own guess is off)
    local_id = int(env.get("SLURM_LOCALID", "0"))
    per_node = _tasks_per_node(env) or 1
    per_task = env.get("SLURM_GPUS_PER_TASK", "")
    if len(visible) == 1 or (per_task.isdigit() and int(per_task) == len(visible)):
        # --gpus-per-task binds each task to its own GPUs: CUDA_VISIBLE_DEVICES lists only them
        # (with --gpu-bind=none it lists the node's: then the split below applies)
        return tuple(range(len(visible)))
    if per_node == 1:
        return tuple(range(len(visible)))
    if len(visible) % per_node:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} lists {len(visible)} GPUs for "
            f"{per_node} tasks on this node: not divisible; use --gpus-per-task or one task per node")
    if local_id >= per_node:
        raise ValueError(f"SLURM_LOCALID={local_id} but only {per_node} tasks per node")
    k = len(visible) // per_node
    return tuple(range(local_id * k, (local_id + 1) * k))


def slurm_coordinator(env: Mapping[str, str], port: int | None = None) -> str:
    """First host of the job step, port from JAX_COORDINATOR_PORT or derived from the job id."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM run without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: start it with srun")
    if port is None:
        port = int(env.get("JAX_COORDINATOR_PORT") or 0) or 61440 + int(env["SLURM_JOB_ID"]) % 4096
    return f"{expand_hostlist(nodelist)[0]}:{port}"
