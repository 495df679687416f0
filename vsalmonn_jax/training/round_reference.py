"""Per-round DPO reference log-probs: the reference is fixed within an mrDPO round, so they are computed
once when the round's pairs are built (sharded, multi-process), stored as round_<r>/reference.jsonl.

The step then reads them from the batch and runs no reference forward; a resumed round reads the
file back (no recompute) and a file that does not match the round's pairs is an error naming it.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np

from vsalmonn_jax.atomic_file import write_jsonl
from vsalmonn_jax.training.policy_env import process_batches

REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
REFERENCE_FILE = "reference.jsonl"


def batch_reference(steps, state, batches: Iterable[dict], count: int, batch_size: int) -> np.ndarray:
    """(chosen, rejected) reference log-probs [count, 2] of rows 0..count-1, on every process.

    batches: this process's rows (`process_batch_rows`) of global batches of `batch_size` rows that
    hold rows 0..count-1 in order, the last one padded with copies of row count-1 (a one-pass,
    unshuffled ListIterator under `local_rows`); "example_id" [rows] is the row. Each process sends
    its rows through the loop's batch-to-device path to `steps.reference` (sharded over data x
    fsdp); the [batch_size] outputs are gathered to every process.
    """
    from vsalmonn_jax.distributed import process_batch_rows, to_host
    from vsalmonn_jax.training.host_batches import report_failure
    from vsalmonn_jax.training.loop import device_batch

    out = np.full((count, 2), np.nan)
    start, stop = process_batch_rows(batch_size, steps.mesh)
    stream = iter(batches)
    for i in itertools.count():
        ids = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), count - 1)   # [B]
        try:   # each process builds its own rows: one that fails tells the others (no hang)
            local = next(stream, None)
            if local is None:
                break
            mine = np.asarray(local["example_id"])                                      # [rows]
            if not np.array_equal(mine, ids[start:stop]):
                raise RuntimeError(f"reference batch {i}: this process's rows hold examples "
                                   f"{mine.tolist()[:8]}, expected {ids[start:stop].tolist()[:8]}")
        except Exception:
            if jax.process_count() > 1:
                report_failure(steps.mesh)   # the others stop at their batch check
            raise
        values = to_host(steps.reference(state, device_batch(local, steps)))   # {field: [B]}
        out[ids] = np.stack([values[k] for k in REFERENCE_FIELDS], axis=1)
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise RuntimeError(f"reference log-probs missing or not finite for rows {bad[:8].tolist()} "
                           f"of {count}")
    return out


def pair_index(records: Sequence[Mapping]) -> list[int]:
    """Positions of the preference records (CE-only and SFT records have no "chosen")."""
    return [i for i, record in enumerate(records) if "chosen" in record]


def compute_reference(env, config, state, records: Sequence[Mapping], mesh, *, batch_size: int,
                      num_steps: int) -> list[dict]:
    """One row {"index", "id", ref_chosen_logps, ref_rejected_logps} per pair record, from the
    round-start `state` (LoRA off + its adapter: at a round start this IS the round's reference).

    The steps are the round's own (`compiled_steps(task, config, num_steps, mesh)`, shared with
    run_stage), so the reference runs the step's forward, packing and shardings; no gradient.
    """
    from vsalmonn_jax.training.loop import compiled_steps, prepare_state

    index = pair_index(records)
    if not index:
        return []
    tx, _, steps, shardings, _ = compiled_steps(env.task, config, num_steps, mesh)
    ref_state, _ = prepare_state(env.task, config, tx, mesh, state=state, shardings=shardings)
    subset = [records[i] for i in index]
    with process_batches(env, subset, mesh, batch_size, seed=0, shuffle=False,
                         repeat=False) as ahead:
        values = batch_reference(steps, ref_state, ahead, len(subset), batch_size)
    return [{"index": i, "id": str(records[i].get("id", "")),
             REFERENCE_FIELDS[0]: float(c), REFERENCE_FIELDS[1]: float(r)}
            for i, (c, r) in zip(index, values, strict=True)]


def save_reference(path: pathlib.Path, rows: Sequence[Mapping]) -> None:
    """Process 0 writes `rows` (atomically: tmp file + rename); every process waits for it."""
    from vsalmonn_jax.distributed import barrier

    if jax.process_index() == 0:
        write_jsonl(path, rows)
    barrier(f"mrdpo_reference:{path.name}")


def load_reference(path: pathlib.Path, records: Sequence[Mapping]) -> list[dict]:
    """The stored rows, checked line by line against the pair records (index, id, finite values);
    a mismatch is a ValueError naming path:line."""
    index = pair_index(records)
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    for k, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON line ({err})") from None
        if k >= len(index):
            raise ValueError(f"{path}:{n}: {len(lines)} reference rows for {len(index)} pair "
                             f"records in pairs.jsonl; delete {path} to recompute")
        want = {"index": index[k], "id": str(records[index[k]].get("id", ""))}
        if {key: row.get(key) for key in want} != want or not all(
                isinstance(row.get(f), int | float) and math.isfinite(row[f])
                for f in REFERENCE_FIELDS):
            raise ValueError(f"{path}:{n}: {json.dumps(row)} does not match pair record {want} of "
                             f"pairs.jsonl (or lacks finite {'/'.join(REFERENCE_FIELDS)}); delete "
                             f"{path} to recompute")
        rows.append(row)
    if len(rows) != len(index):
        raise ValueError(f"{path}:{len(lines) + 1}: {len(rows)} reference rows for {len(index)} "
                         f"pair records in pairs.jsonl; delete {path} to recompute")
    return rows


def with_reference(records: Sequence[Mapping], rows: Sequence[Mapping]) -> list[dict]:
    """Records carrying REFERENCE_FIELDS: the rows' values on pair records, 0.0 on the others (the
    log-prob of an empty response), so every batch carries them and no step runs the reference."""
    out = [dict(record, **{f: 0.0 for f in REFERENCE_FIELDS}) for record in records]
    for row in rows:
        out[int(row["index"])].update({f: float(row[f]) for f in REFERENCE_FIELDS})
    return out


def round_reference(env, config, state, records: Sequence[Mapping], mesh, path: pathlib.Path, *,
                    batch_size: int, num_steps: int) -> list[dict]:
    """`records` with their round's reference log-probs: read back from `path` when stored (a
    resumed round: nothing is recomputed), else computed (every process its rows) and saved."""
    if path.exists():
        rows = load_reference(path, records)
    else:
        rows = compute_reference(env, config, state, records, mesh, batch_size=batch_size,
                                 num_steps=num_steps)
        save_reference(path, rows)
    return with_reference(records, rows)
