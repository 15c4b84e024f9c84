"""A checkpoint written by an earlier version of the code (main at 72359b9, before the module split) must still
load, translate and resume. tests/fixtures/legacy/interrupted.pt is the last.pt of

    python train.py --data_files tests/fixtures/pairs.jsonl <TINY flags> --epochs 2 --dropout 0.2 --amp off --seed 1

stopped by SIGTERM after step 4; uninterrupted_metrics.json holds that command's metrics run without a stop.
Resuming it today takes the flags whose defaults changed since: `--n_decoder_layers 0` (its decoder was as deep
as its encoder; the default is now 1), `--ema_decay 0` (it had no weight averaging), `--val_fraction 0.1` and
`--lowercase_source false` (its source vocabulary kept case)."""
import json
import os

import pytest

import train
from conftest import ROOT, TINY, run_script

LEGACY = os.path.join(ROOT, "tests", "fixtures", "legacy")
CHECKPOINT = os.path.join(LEGACY, "interrupted.pt")
COMMAND = ["--data_files", "tests/fixtures/pairs.jsonl", *TINY, "--epochs", "2", "--dropout", "0.2", "--amp", "off",
           "--seed", "1"]
ARGS = [*COMMAND, "--n_decoder_layers", "0", "--ema_decay", "0", "--val_fraction", "0.1",
        "--lowercase_source", "false"]


def test_a_checkpoint_from_an_earlier_version_translates():
    result = run_script("translate.py", "--checkpoint", CHECKPOINT, "--device", "cpu", stdin="I am tired.\nGo!\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("\n")) == 3


def test_a_checkpoint_from_an_earlier_version_resumes_like_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the checkpoint names its data file relative to the repository
    train.main([*ARGS, "--run_dir", str(tmp_path), "--resume", CHECKPOINT])
    with open(os.path.join(LEGACY, "uninterrupted_metrics.json")) as file:
        expected = json.load(file)
    with open(tmp_path / "metrics.jsonl") as file:
        resumed = [json.loads(line) for line in file]
    assert [line["step"] for line in resumed] == [line["step"] for line in expected] == [7, 15]
    for a, b in zip(expected, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_resuming_an_earlier_checkpoint_under_a_changed_default_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*COMMAND, "--val_fraction", "0.1", "--lowercase_source", "false", "--run_dir", str(tmp_path),
                    "--resume", CHECKPOINT])
    assert "was trained with --n_decoder_layers 0 but this run has --n_decoder_layers 1" in str(exit_info.value.code)
