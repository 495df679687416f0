"""`vsalmonn-jax train` on synthetic text data: SFT, then DPO initialised from the SFT run (LoRA
merged into the base, so the DPO reference is the SFT model and the loss starts at log 2)."""

import json
import math

import pytest

from vsalmonn_jax.cli import main


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_train_cli_sft_then_dpo(tmp_path, capsys):
    common = ["--config", "tiny", "--config.data.batch_size=1",
              "--config.train.num_steps=4", "--config.train.checkpoint_every=2", "--no-progress"]
    sft = tmp_path / "sft"
    rc = main(["train", *common, "--config.stage=sft", "--config.data.train=synthetic:16",
               "--workdir", str(sft)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 4 and report["checkpoint"].endswith("/4")
    assert [r["step"] for r in _lines(sft / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((sft / "config.json").read_text())["stage"] == "sft"
    dpo = tmp_path / "dpo"
    rc = main(["train", *common, "--config.stage=dpo", "--config.data.train=synthetic:16",
               "--workdir", str(dpo), "--init-from", str(sft)])
    assert rc == 0
    first = _lines(dpo / "metrics.jsonl")[0]
    assert first["dpo_loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)


def test_train_cli_usage_errors(capsys):
    assert main(["train"]) == 2
    assert "--config configs/X.py is required" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--config.stage=sft"]) == 2
    assert "--config.data.train=PATH.jsonl" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--config.stage=mrdpo", "--config.data.train=synthetic:4"]) == 2
    assert "stage mrdpo samples captions of real caption records" in capsys.readouterr().err


@pytest.mark.slow
def test_train_cli_av_pipeline(tmp_path, capsys):
    """Real synthetic .mp4 records through the data pipeline into the AV model (SFT, eval)."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--n", "4", "--n-val", "2", "--n-test", "0"]) == 0
    run = tmp_path / "run"
    rc = main(["train", "--config", "tiny", "--config.stage=sft", "--config.mesh.data=-1",
               f"--config.data.train={data}/sft_train.jsonl", f"--config.data.val={data}/sft_val.jsonl",
               f"--config.data.root={data}", f"--config.data.tokenizer={data}/tokenizer",
               "--config.train.num_steps=2", "--config.train.eval_every=2", "--workdir", str(run),
               "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["step"] == 2 and report["last"]["target_tokens"] > 0
    records = _lines(run / "metrics.jsonl")
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and 0 < evals[0]["loss"] < 20 and evals[0]["target_tokens"] > 0
