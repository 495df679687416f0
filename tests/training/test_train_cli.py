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
