"""What a run does for long sentences: extra evaluation sets scored at every evaluation (never trained on), the
ratio length filter (a pair kept whole or dropped), and temperature sampling over the data files (the observed
mix is the one asked for, and a resumed run draws exactly what an uninterrupted one does)."""
import collections
import json

import pytest
import torch

import batching
import dataset
import train
from config import Config
from conftest import FIXTURE, tiny_args
from conftest import Crash, crash_at, read_metrics


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"translation": {"en": en, "fr": fr}}) + "\n" for en, fr in pairs))
    return str(path)


def fixture_pairs():
    return dataset.read_pairs([FIXTURE], "en", "fr")[0]


def test_the_ratio_filter_keeps_long_targets_whole_and_ratio_1_is_the_reference():
    src = [[1] * 20, [1] * 20, [1] * 20, [1] * 3, [1] * 200]
    tgt = [[1] * 30, [1] * 40, [1] * 41, [1] * 14, [1] * 10]
    assert dataset.length_filter(src, tgt, 150, 1.5, 10) == [0, 1, 3]  # 1.5 x 20 + 10 = 40 tokens at most
    assert dataset.length_filter(src, tgt, 150, 1.0, 10) == [0]  # target <= source + 10, the reference's
    with pytest.raises(ValueError, match="--max_positions must exceed"):
        Config(max_len_ratio=7, max_src_tokens=150, max_positions=1024).validate()


def test_eval_files_never_train_and_are_scored_at_every_evaluation(tmp_path):
    pairs = fixture_pairs()
    held_out = write_pairs(tmp_path / "held_out.jsonl", pairs[:30])
    messages = []
    cfg = Config(data_files=[FIXTURE], eval_files=[held_out, held_out], tokenizer="bpe", vocab_size=400)
    data = dataset.prepare_data(cfg, log=messages.append)
    assert any("training pairs have the source of an --eval_files pair" in m for m in messages), messages
    train_sources = {tuple(data.train.source(i)) for i in range(len(data.train))}  # byte-level BPE: one string, one id list
    for examples, _ in data.eval_sets.values():
        assert not train_sources & {tuple(examples.source(i)) for i in range(len(examples))}
    assert set(data.eval_sets) == {"held_out", "held_out_2"}  # two files of one name stay two sets

    train.main(tiny_args(tmp_path / "run", "--epochs", "2", "--eval_files", held_out))
    lines = read_metrics(tmp_path / "run")
    assert len(lines) == 2
    for line in lines:
        assert {"held_out/loss", "held_out/bleu", "held_out/chrf", "held_out/seconds"} <= set(line)
        assert line["eval_seconds"] >= line["held_out/seconds"] > 0  # its cost is part of the evaluation's


def test_a_run_without_eval_files_evaluates_the_validation_split_only(tmp_path):
    train.main(tiny_args(tmp_path, "--epochs", "1"))
    assert not [key for key in read_metrics(tmp_path)[0] if "/" in key]


def test_temperature_sampling_draws_the_asked_mix_every_epoch_and_sees_every_pair():
    groups = [0] * 40 + [1] * 600 + [2] * 160  # a small file, a large one, a middling one
    draws = batching.temperature_draws(groups, 2.0)
    weights = [n ** 0.5 for n in (40, 600, 160)]
    for (members, count), weight in zip(draws, weights):
        assert count == pytest.approx(len(groups) * weight / sum(weights), abs=1)
    assert batching.temperature_draws(groups, 1.0) is None and batching.temperature_draws([0] * 9, 3.0) is None
    sampler = batching.BatchSampler([(5, 6)] * len(groups), batch_size=16, batching="packed", seed=7, draws=draws)
    seen = collections.Counter()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = [i for batch in sampler.batches() for i in batch]
        per_group = collections.Counter(groups[i] for i in drawn)
        assert [per_group[g] for g in range(3)] == [count for _, count in draws]  # exactly the asked mix
        seen.update(drawn)
    large = range(40, 640)
    assert all(seen[i] >= 1 for i in large)  # a file drawn below its size is still seen whole over the epochs
    assert max(seen[i] for i in large) - min(seen[i] for i in large) <= 1  # and evenly
    assert min(seen[i] for i in range(40)) >= 3  # a small one is repeated in every epoch
    again = batching.BatchSampler([(5, 6)] * len(groups), batch_size=16, batching="packed", seed=7, draws=draws)
    again.set_epoch(2)
    assert again.batches() == sampler.batches(2)  # a function of (seed, epoch) only: what a resume redraws


def test_a_resumed_temperature_sampled_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    pairs = fixture_pairs()
    files = [write_pairs(tmp_path / "short.jsonl", pairs[:60]), write_pairs(tmp_path / "rest.jsonl", pairs[60:])]
    args = ("--epochs", "2", "--dropout", "0.2", "--sampling_temperature", "3")
    runs = {name: ["--data_files", *files, *tiny_args(tmp_path / name, *args)[2:]] for name in ("straight", "resumed")}
    train.main(runs["straight"])
    steps_per_epoch = read_metrics(tmp_path / "straight")[0]["step"]
    crash_at(monkeypatch, steps_per_epoch + 2, "kill")
    with pytest.raises(Crash):
        train.main(runs["resumed"])
    monkeypatch.undo()
    train.main(runs["resumed"] + ["--resume", "auto"])
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [line["val_loss"] for line in straight] == [line["val_loss"] for line in resumed]
    weights = [torch.load(tmp_path / name / "last.pt", weights_only=True)["model"] for name in ("straight", "resumed")]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
