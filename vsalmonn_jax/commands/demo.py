"""`vsalmonn-jax demo [--quick] [--resume RUN_DIR]`: the whole method end to end on synthetic data,
with a report at runs/demo-<time>/report.md (see vsalmonn_jax/demo/pipeline.py for the stages)."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsalmonn-jax demo", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (~3 min), used by the tests")
    p.add_argument("--resume", default="", help="continue a run directory; finished stages are skipped")
    p.add_argument("--out", default="", help="run directory (default <workdir>/demo-<time>[-quick])")
    p.add_argument("--data", default="", help="data directory (default: <workdir>/demo-data/<key>, "
                   "shared by every run with the same data and model settings, linked as <run dir>/data)")
    p.add_argument("--report-only", action="store_true",
                   help="with --resume: write the report from the stages finished so far")
    return p


def demo_config(quick: bool, config_path: str | None, overrides: list[str]):
    """configs/demo.py (or --config), with demo.quick applied for --quick, then CLI overrides."""
    from vsalmonn_jax.config import apply_override, load_config

    config = load_config(config_path or "demo")
    if quick:
        config.demo.update(config.demo.quick.to_dict())
    for override in overrides:
        apply_override(config, override)
    return config


def resolve_data_dir(config, run_dir: pathlib.Path, data_arg: str) -> pathlib.Path:
    """--data DIR, else the run's own data/ when it has one (resume, or runs made before sharing),
    else the shared folder for this data key, linked as <run dir>/data."""
    if data_arg:
        return pathlib.Path(data_arg)
    own = run_dir / "data"
    if own.is_symlink() and not own.exists():   # its shared folder was deleted: make it anew
        own.resolve().mkdir(parents=True, exist_ok=True)
    if own.exists():
        return own
    from vsalmonn_jax.demo.data import shared_data_dir

    shared = shared_data_dir(config).absolute()
    shared.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    own.symlink_to(shared, target_is_directory=True)
    return own


def _report_only(config, run_dir: pathlib.Path) -> int:
    from vsalmonn_jax.demo.pipeline import finished_records
    from vsalmonn_jax.demo.report import write_report

    records, missing = finished_records(config, run_dir)
    if "sft" not in records:
        print(f"vsalmonn-jax demo: {run_dir}: the sft stage has not finished; no report",
              file=sys.stderr)
        return 2
    report = write_report(run_dir, records, config, wall_s=0.0, missing=missing)
    print(f"Report (partial: {len(missing)} stage(s) unfinished) written to {report}"
          if missing else f"Report written to {report}")
    return 0


def _settings_changed(run_dir: pathlib.Path, config) -> str:
    """The settings of `config` that differ from the run's saved config.json ("field: saved -> new",
    free fields and the data folder aside); "" when none differ or nothing was saved. A resume
    rebuilds its config from the command line, and continued silently with the preset's settings
    when the run's flags were not given again (a --quick run's data under the full sizes)."""
    from vsalmonn_jax.training.run_config import as_dict, config_changes, is_free, read_run_config

    saved = read_run_config(run_dir)
    if saved is None:
        return ""
    changes = {k: v for k, v in config_changes(saved, as_dict(config)).items()
               if not is_free(k) and k != "demo.data_dir"}
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6]) + \
        (f"; {len(changes) - 6} more" if len(changes) > 6 else "")


def main(argv: list[str]) -> int:
    from vsalmonn_jax.config import split_config_args

    config_path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    try:
        config = demo_config(args.quick, config_path, overrides)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"vsalmonn-jax demo: {err}", file=sys.stderr)
        return 2
    from vsalmonn_jax.config_check import check_for_cli

    if check_for_cli("vsalmonn-jax demo", config):
        return 2
    if args.report_only and not args.resume:
        print("vsalmonn-jax demo: --report-only needs --resume RUN_DIR", file=sys.stderr)
        return 2
    if args.resume:
        run_dir = pathlib.Path(args.resume)
        if not run_dir.is_dir():
            print(f"vsalmonn-jax demo: --resume {run_dir}: no such run directory", file=sys.stderr)
            return 2
        changed = _settings_changed(run_dir, config)
        if changed:
            print(f"vsalmonn-jax demo: --resume {run_dir}: the run was made with other settings "
                  f"({changed}); pass the run's --quick / --config.* flags again", file=sys.stderr)
            return 2
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = pathlib.Path(args.out or f"{config.workdir}/demo-{stamp}{'-quick' if args.quick else ''}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:   # reads the finished stages only: no data folder, config.json untouched
        return _report_only(config, run_dir)
    data_dir = resolve_data_dir(config, run_dir, args.data)
    config.demo.data_dir = str(data_dir.absolute())   # caption --checkpoint RUN reads it (demo/serve.py)
    (run_dir / "config.json").write_text(config.to_json_best_effort(indent=1))
    log_file = open(run_dir / "demo.log", "a")
    start = time.perf_counter()

    def log(message: str) -> None:
        line = f"[{time.perf_counter() - start:7.1f}s] {message}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    from vsalmonn_jax.demo.pipeline import Preempted, run_demo
    from vsalmonn_jax.demo.report import write_report

    log(f"vsalmonn-jax demo{' --quick' if args.quick else ''}: run directory {run_dir}")
    try:
        records = run_demo(config, run_dir, data_dir, log)
    except Preempted as stop:
        log(f"{stop}; continue with: vsalmonn-jax demo --resume {run_dir}")
        log_file.close()
        return 143
    report = write_report(run_dir, records, config, wall_s=time.perf_counter() - start)
    log(f"report: {report}")
    log_file.close()
    print(f"Report written to {report}")
    return 0
