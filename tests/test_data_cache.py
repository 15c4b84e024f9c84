"""The prepared-data cache: what its key covers, that its arrays are the in-memory encoding id for id, that runs and
DDP ranks share one preparation, and that every fault while preparing or reading it ends in one line or a fresh
preparation, never in training on half an entry."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import datacache
import dataset
import reading
import train
from config import Config
from conftest import FIXTURE, ROOT, assert_same_training, crash_at, free_port, one_line_failure, tiny_args

DATA = dict(data_files=[FIXTURE], max_val_pairs=0)


def prepared(cfg, tokenizers=None):
    """The Data, and the log lines, of preparing cfg's data."""
    lines = []
    return dataset.prepare_data(cfg, tokenizers, lines.append), lines


def mapped(lines):
    return "mapped from" in lines[-1]


def entries(root):
    return sorted(name for name in os.listdir(root) if not name.endswith(".lock"))


def assert_same_data(a, b):
    assert a.src_tokenizer.to_str() == b.src_tokenizer.to_str() and a.tgt_tokenizer.to_str() == b.tgt_tokenizer.to_str()
    assert len(a.train) == len(b.train) > 0
    for i in range(len(a.train)):
        assert a.train.source(i) == b.train.source(i) and a.train.target(i) == b.train.target(i)
        assert [t.tolist() for t in a.train[i]] == [t.tolist() for t in b.train[i]]
    assert all(np.array_equal(x, y) for x, y in zip(a.train.lengths(), b.train.lengths()))
    assert list(a.train_files) == list(np.asarray(b.train_files))
    assert (a.val_pairs, a.fingerprint, a.eval_fingerprint, a.n_train_pairs) == (
        b.val_pairs, b.fingerprint, b.eval_fingerprint, b.n_train_pairs)
    assert [a.val.source(i) for i in range(len(a.val))] == [b.val.source(i) for i in range(len(b.val))]


@pytest.fixture
def shards(tmp_path):
    """The fixture in two shards with a pair repeated across them, and an evaluation file of some of its pairs."""
    lines = open(FIXTURE, encoding="utf-8").read().splitlines()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (tmp_path / "shards" / "b.jsonl").write_text("\n".join(lines[150:]) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[20:30]) + "\n", encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("settings", [{}, {"tokenizer": "bpe", "vocab_size": 300},
                                      {"tokenizer": "bpe", "vocab_size": 300, "tokenizer_sample_pairs": 120},
                                      {"max_src_tokens": 8, "max_len_ratio": 1.0, "max_len_diff": 2}])
def test_the_cache_holds_the_in_memory_encoding_id_for_id(shards, tmp_path, settings):
    cfg = Config(data_files=[str(shards / "shards")], eval_files=[str(shards / "eval.jsonl")], val_fraction=0.1,
                 data_cache=str(tmp_path / "cache"), **settings)
    in_memory, memory_lines = prepared(dataclasses.replace(cfg, data_cache="off"))
    first, first_lines = prepared(cfg)
    again, again_lines = prepared(cfg)
    assert not mapped(first_lines) and mapped(again_lines)
    assert_same_data(in_memory, first)
    assert_same_data(in_memory, again)
    assert isinstance(again.train.src_flat, np.memmap) and again.train.src_flat.dtype == np.uint16
    assert any("repeat a validation pair" in line for line in memory_lines)  # the shards overlap
    assert any("--eval_files" in line for line in memory_lines)
    assert [line for line in memory_lines if "ready in" not in line] == [
        line for line in again_lines if "ready in" not in line]  # a run that maps the entry says what it held


def test_a_changed_file_is_prepared_again_even_with_the_same_size_and_modification_time(tmp_path):
    data_file = tmp_path / "pairs.jsonl"
    shutil.copy(FIXTURE, data_file)
    cfg = Config(data_files=[str(data_file)], data_cache=str(tmp_path / "cache"))
    before, _ = prepared(cfg)
    stat = os.stat(data_file)
    text = data_file.read_text(encoding="utf-8")
    data_file.write_text(text.replace('"en": "Come', '"en": "Home', 1), encoding="utf-8")
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(data_file).st_size == stat.st_size and os.stat(data_file).st_mtime_ns == stat.st_mtime_ns
    after, lines = prepared(cfg)
    assert not mapped(lines) and after.fingerprint != before.fingerprint
    assert len(entries(tmp_path / "cache")) == 2


CHANGED = {"lang_src": "fr", "lang_tgt": "en", "val_fraction": 0.05, "max_val_pairs": 7, "seed": 1,
           "tokenizer": "bpe", "vocab_size": 500, "min_frequency": 3, "lowercase_source": False, "max_src_tokens": 20,
           "max_len_ratio": 2.0, "max_len_diff": 3, "tokenizer_sample_pairs": 100}


def test_every_setting_that_shapes_the_ids_is_in_the_key_and_no_other():
    assert set(CHANGED) == set(dataset.KEY_FIELDS)
    base = Config(**DATA)
    key = datacache.key_of(dataset.cache_key_parts(base))
    keys = {name: datacache.key_of(dataset.cache_key_parts(dataclasses.replace(base, **{name: value})))
            for name, value in CHANGED.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys)
    with_eval = dataclasses.replace(base, eval_files=[FIXTURE])
    assert datacache.key_of(dataset.cache_key_parts(with_eval)) != key
    for unshaping in ({"max_positions": 64}, {"d_model": 64}, {"lr": 0.1}, {"data_cache": "/elsewhere"}):
        assert datacache.key_of(dataset.cache_key_parts(dataclasses.replace(base, **unshaping))) == key


def test_a_checkpoints_tokenizers_map_the_entry_they_came_from_or_one_of_their_own(tmp_path):
    cfg = Config(**DATA, data_cache=str(tmp_path / "cache"))
    data, _ = prepared(cfg)
    same, lines = prepared(cfg, (data.src_tokenizer, data.tgt_tokenizer))
    assert mapped(lines) and len(entries(tmp_path / "cache")) == 1
    other, _ = prepared(dataclasses.replace(cfg, min_frequency=1, data_cache="off"))
    theirs, lines = prepared(cfg, (other.src_tokenizer, other.tgt_tokenizer))
    assert not mapped(lines) and len(entries(tmp_path / "cache")) == 2
    assert theirs.src_tokenizer.to_str() == other.src_tokenizer.to_str()
    assert_same_data(prepared(dataclasses.replace(cfg, data_cache="off"), (other.src_tokenizer, other.tgt_tokenizer))[0],
                     theirs)


def test_directories_and_globs_of_shards_train_as_the_files_they_hold(shards, tmp_path):
    named = [str(shards / "shards" / "a.jsonl"), str(shards / "shards" / "b.jsonl")]
    assert reading.data_file_paths([str(shards / "shards")]) == named
    assert reading.data_file_paths([str(shards / "shards" / "*.jsonl")]) == named
    assert reading.data_file_paths([str(shards / "**" / "b.jsonl")]) == named[1:]
    as_files, _ = prepared(Config(data_files=named, data_cache="off"))
    as_directory, _ = prepared(Config(data_files=[str(shards / "shards")], data_cache=str(tmp_path / "cache")))
    assert_same_data(as_files, as_directory)
    (tmp_path / "empty").mkdir()
    for paths, message in (([str(tmp_path / "empty")], "is a directory without .jsonl"),
                           ([str(tmp_path / "no" / "*.jsonl")], "matches no .jsonl")):
        with pytest.raises(dataset.RunError, match=message):
            reading.data_file_paths(paths)


def test_the_hub_path_prepares_through_datasets_into_the_same_cache(tmp_path, monkeypatch):
    """The hub cannot be reached here: the same datasets.Dataset, loaded from the fixture, stands in for it."""
    import datasets
    hub = datasets.load_dataset("json", data_files=FIXTURE, split="train", cache_dir=str(tmp_path / "hf"))
    monkeypatch.setattr(dataset, "hub_rows", lambda *args: hub)
    monkeypatch.setattr(reading, "hub_rows", lambda *args: hub)
    cfg = Config(data_cache=str(tmp_path / "cache"))
    in_memory, _ = prepared(dataclasses.replace(cfg, data_cache="off"))
    first, first_lines = prepared(cfg)
    again, again_lines = prepared(cfg)
    assert not mapped(first_lines) and mapped(again_lines)
    assert_same_data(in_memory, again)
    assert_same_data(prepared(Config(data_files=[FIXTURE], data_cache="off"))[0], again)


def test_a_run_resumed_through_the_cache_reports_what_an_uninterrupted_one_does(tmp_path, monkeypatch, capsys):
    args = ("--epochs", "2", "--dropout", "0.2", "--data_cache", str(tmp_path / "cache"))
    train.main(tiny_args(tmp_path / "straight", *args))
    crash_at(monkeypatch, 11, "sigterm")  # mid-epoch 2
    with pytest.raises(SystemExit):
        train.main(tiny_args(tmp_path / "stopped", *args))
    monkeypatch.undo()
    capsys.readouterr()
    train.main(tiny_args(tmp_path / "stopped", *args, "--resume", "auto"))
    assert "mapped from" in capsys.readouterr().out
    assert_same_training(tmp_path / "straight", tmp_path / "stopped")
    assert len(entries(tmp_path / "cache")) == 1


# ---------------------------------------------------------------- faults

def test_a_damaged_entry_is_prepared_again_never_trained_on(tmp_path):
    cfg = Config(**DATA, data_cache=str(tmp_path / "cache"))
    prepared(cfg)
    data, _ = prepared(dataclasses.replace(cfg, data_cache="off"))  # not a map of the files damaged below
    entry = tmp_path / "cache" / entries(tmp_path / "cache")[0]
    for damage in (lambda path: os.truncate(path, os.path.getsize(path) - 2),  # truncated
                   lambda path: path.write_bytes(bytes([path.read_bytes()[0] ^ 1]) + path.read_bytes()[1:]),  # a bit
                   lambda path: os.remove(path),
                   lambda path: (entry / datacache.DESCRIPTION).write_text("{")):
        damage(entry / "src_tokens.bin")
        again, lines = prepared(cfg)
        assert any("is damaged" in line for line in lines) and not mapped(lines)
        assert_same_data(data, again)


def test_an_unwritable_cache_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    err = one_line_failure(train.main, tiny_args(tmp_path / "run", "--data_cache", str(tmp_path / "a_file" / "cache")),
                           capsys)
    assert "cannot write the data cache in" in err and "--data_cache off" in err


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, small_tmpfs):
    cache = small_tmpfs("24k")
    err = one_line_failure(train.main, tiny_args(tmp_path / "run", "--data_cache", str(cache)), capsys)
    assert "no space left on the device" in err
    assert entries(cache) == []  # no entry, and no staging directory either


# train.py with a marker and a pause while the tokenizers train, so that a second run or a signal surely comes then
DRIVER = """
import sys, time
sys.path.insert(0, {root!r})
import dataset, train
real_train = dataset.train_tokenizers

def slow_train(*args, **kwargs):
    print("PREPARING", flush=True)
    time.sleep({pause})
    return real_train(*args, **kwargs)

dataset.train_tokenizers = slow_train
train.main(sys.argv[1:])
"""


def start(run_dir, cache, pause=1.5):
    return subprocess.Popen([sys.executable, "-c", DRIVER.format(root=ROOT, pause=pause),
                             *tiny_args(run_dir, "--epochs", "1", "--data_cache", str(cache))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(process, marker):
    for line in process.stdout:
        if line.strip() == marker:
            return


def test_two_runs_preparing_the_same_data_at_once_prepare_it_once(tmp_path):
    first = start(tmp_path / "first", tmp_path / "cache", pause=10)  # longer than the second takes to start
    wait_for(first, "PREPARING")
    second = start(tmp_path / "second", tmp_path / "cache")
    outs = [process.communicate(timeout=120)[0] for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0
    assert "another run is preparing the same data" in outs[1] and "PREPARING" not in outs[1]
    assert "mapped from" in outs[1]
    assert len(entries(tmp_path / "cache")) == 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_a_stop_while_preparing_leaves_no_entry_marked_complete(tmp_path, signum):
    process = start(tmp_path / "run", tmp_path / "cache", pause=30)
    wait_for(process, "PREPARING")
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    if signum == signal.SIGINT:
        assert "interrupted during set-up" in err and "Traceback" not in err
        assert entries(tmp_path / "cache") == []
    else:  # a staging directory may be left behind, never an entry; the next run clears it away
        assert all(name.startswith(datacache.STAGING) for name in entries(tmp_path / "cache"))
    train.main(tiny_args(tmp_path / "again", "--epochs", "1", "--data_cache", str(tmp_path / "cache")))
    assert len(entries(tmp_path / "cache")) == 1 and not entries(tmp_path / "cache")[0].startswith(datacache.STAGING)


def test_two_ddp_ranks_share_one_preparation(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=ROOT, pause=0))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                             str(free_port()), str(driver), *tiny_args(tmp_path / "run", "--epochs", "1",
                                                                       "--data_cache", str(tmp_path / "cache"))],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("PREPARING") == 1
    assert len(entries(tmp_path / "cache")) == 1
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] > 0
