"""A checkpoint written by an earlier version of the code (main at 72359b9, before the module split) must still
load, translate and resume. tests/fixtures/legacy/interrupted.pt is the last.pt of

    python train.py --data_files tests/fixtures/pairs.jsonl <TINY flags> --epochs 2 --dropout 0.2 --amp off --seed 1

stopped by SIGTERM after step 4; uninterrupted_metrics.json holds that command's metrics run without a stop.
Resuming it takes the flags it was trained with wherever today's defaults differ (its decoder was as deep as its
encoder, it had no weight averaging, its source vocabulary kept case, OneCycle cycled its momentum, ...): the
tests spell out every field of its config, so that editing config.py's defaults changes none of them. Its
self-attentions also hold a query and a key-value matrix each, which loading joins into one (weights and the
optimizer's moments)."""
import dataclasses
import json
import os

import pytest
import torch

import checkpoint
import train
import translate
from config import AUTO_VALUES, Config
from conftest import ROOT, assert_same_training, crash_at, read_metrics, run_script, tiny_args

LEGACY = os.path.join(ROOT, "tests", "fixtures", "legacy")
CHECKPOINT = os.path.join(LEGACY, "interrupted.pt")


def flags_trained_with(leave_out=()):
    """Flags for every field of the checkpoint's config (fields it predates at the values it trained with),
    but those a resume may change and `leave_out`."""
    saved = checkpoint.saved_config(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    flags = []
    for field in dataclasses.fields(Config):
        if field.name in checkpoint.RESUME_MAY_CHANGE or field.name in leave_out or field.name not in saved:
            continue
        value = saved[field.name]
        values = value if isinstance(value, list) else ["true" if value else "false"] if isinstance(value, bool) \
            else [str(value)]
        flags += [f"--{field.name}", *values]
    return flags


ARGS = [*flags_trained_with(), "--device", "cpu", "--amp", "off"]


def test_a_checkpoint_from_an_earlier_version_translates():
    result = run_script("translate.py", "--checkpoint", CHECKPOINT, "--device", "cpu", stdin="I am tired.\nGo!\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("\n")) == 3


def test_a_checkpoint_from_an_earlier_version_resumes_like_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the checkpoint names its data file relative to the repository
    train.main([*ARGS, "--run_dir", str(tmp_path), "--resume", CHECKPOINT])
    with open(os.path.join(LEGACY, "uninterrupted_metrics.json")) as file:
        expected = json.load(file)
    resumed = read_metrics(tmp_path)
    assert [line["step"] for line in resumed] == [line["step"] for line in expected] == [7, 15]
    for a, b in zip(expected, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)


def test_resuming_an_earlier_checkpoint_under_a_changed_default_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    saved = checkpoint.saved_config(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    changed = next(f.name for f in dataclasses.fields(Config) if f.name not in checkpoint.RESUME_MAY_CHANGE
                   and f.name not in AUTO_VALUES and f.name in saved and saved[f.name] != getattr(Config(), f.name))
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags_trained_with(leave_out={changed}), "--device", "cpu", "--run_dir", str(tmp_path),
                    "--resume", CHECKPOINT])
    assert f"was trained with --{changed} {saved[changed]} but this run has --{changed} " in str(exit_info.value.code)


def split_query(joined):
    """(query part, key-value part) of a joined query_key_value weight, bias or moment."""
    return joined.split([joined.size(0) // 3, joined.size(0) * 2 // 3])


def separate_self_attention_projections(checkpoint, model):
    """A checkpoint of today's code in the layout before self-attention joined its projections: a query and a
    key_value matrix, each weight followed by its bias, in the weights and in AdamW's per-parameter state."""
    for weights in (checkpoint["model"], checkpoint["training_model"]):
        for name in [name for name in weights if ".self_attn.query_key_value." in name]:
            prefix, _, kind = name.rpartition(".query_key_value.")
            weights[f"{prefix}.query.{kind}"], weights[f"{prefix}.key_value.{kind}"] = split_query(weights.pop(name))
    saved, state = checkpoint["optimizer"], {}
    for index, (name, _) in enumerate(model.named_parameters()):
        if name.endswith("query_key_value.bias"):
            continue
        if name.endswith("query_key_value.weight"):
            weight, bias = saved["state"][index], saved["state"][index + 1]
            parts = [{key: split_query(value)[part] if value.dim() else value for key, value in moments.items()}
                     for part in (0, 1) for moments in (weight, bias)]
        else:
            parts = [saved["state"][index]]
        for part in parts:
            state[len(state)] = part
    saved["state"] = state
    saved["param_groups"][0]["params"] = list(range(len(state)))


def test_a_checkpoint_with_separate_self_attention_projections_resumes_exactly(tmp_path, monkeypatch):
    # one parameter group, as every checkpoint of that layout had (they predate --decay_norms_and_biases)
    args = ("--epochs", "2", "--ema_decay", "0.8", "--dropout", "0.2", "--decay_norms_and_biases", "true")
    train.main(tiny_args(tmp_path / "straight", *args))
    crash_at(monkeypatch, 4, "sigterm")
    with pytest.raises(SystemExit):
        train.main(tiny_args(tmp_path / "stopped", *args))
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 4
    model = translate.load_translator(tmp_path / "stopped" / "last.pt", torch.device("cpu"))[0]
    separate_self_attention_projections(checkpoint, model)
    assert any(name.endswith("self_attn.key_value.weight") for name in checkpoint["training_model"])
    torch.save(checkpoint, tmp_path / "separate.pt")
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", str(tmp_path / "separate.pt")))
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")
