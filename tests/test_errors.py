"""Every user mistake or environmental fault ends in one line on stderr, a non-zero exit and no traceback."""
import errno
import os
import subprocess
import sys

import pytest
import torch

import dataset
import train
from conftest import ROOT, run_script, tiny_args


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_data_file_that_is_not_utf8_names_its_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"translation": {"en": "Hi.", "fr": "Salut."}}\n' * 3 + b"\xff\xfe bad bytes\n")
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--data_files", str(latin)),
                          "latin.jsonl:4: not UTF-8", "convert the file to UTF-8")


def test_byte_order_mark_and_windows_line_endings_are_accepted(tmp_path):
    rows = ['{"translation": {"en": "Hello.", "fr": "Bonjour."}}', '{"translation": {"en": "Thanks.", "fr": "Merci."}}']
    jsonl, tsv = tmp_path / "bom.jsonl", tmp_path / "bom.tsv"
    jsonl.write_bytes("\ufeff".encode() + "\r\n".join(rows).encode() + b"\r\n")
    tsv.write_bytes("\ufeffHello.\tBonjour.\r\nThanks.\tMerci.\r\n".encode())
    for path in (jsonl, tsv):
        assert dataset.read_pairs([str(path)], "en", "fr") == ([("Hello.", "Bonjour."), ("Thanks.", "Merci.")], 0)


def test_bad_paths_give_one_line(tmp_path):
    a_file, a_directory = tmp_path / "file", tmp_path / "pairs.jsonl"
    a_file.write_text("not a directory")
    a_directory.mkdir()
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--data_files", str(a_directory)),
                          "pairs.jsonl is a directory")
    assert_one_line_error(run_script("train.py", *tiny_args(a_file)), f"cannot use --run_dir {a_file}")


def test_a_checkpoint_that_is_not_ours_or_carries_pickled_code_is_refused(tmp_path):
    foreign, pickled = str(tmp_path / "foreign.pt"), str(tmp_path / "pickled.pt")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    torch.save({"model": {}, "config": {}, "tokenizers": [], "payload": subprocess.Popen}, pickled)
    for path, message in [(foreign, "is not a checkpoint written by train.py (it lacks model, config, tokenizers)"),
                          (pickled, "holds pickled Python objects")]:
        assert_one_line_error(run_script("translate.py", "--checkpoint", path, "Hello."), message)
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--resume", foreign), "foreign.pt")


def test_eval_file_with_a_missing_reference_names_its_line(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"translation": {"en": "Hi.", "fr": "Salut."}}\n{"translation": {"en": "Go."}}\n')
    assert_one_line_error(run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(pairs)),
                          "pairs.jsonl:2: needs a non-empty 'en' source and 'fr' reference")


def test_too_long_input_lines_are_cut_and_named_and_every_line_is_kept(checkpoint):
    long_line = " ".join(["word"] * 3000)
    result = run_script("translate.py", "--checkpoint", checkpoint, "--device", "cpu",
                        stdin=f"Hello.\n{long_line}\nGo.\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert len(result.stdout.split("\n")) == 4  # three translations and the final newline
    [warning] = result.stderr.strip().splitlines()
    assert "input line 2 has 3000 tokens" in warning and "translated its first 1023 tokens" in warning


def test_stdin_that_is_not_utf8_names_its_line(checkpoint):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "translate.py"), "--checkpoint", checkpoint],
                            input=b"Hello.\n\xff bad\n", capture_output=True, timeout=120)
    result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())
    assert_one_line_error(result, "standard input line 2 is not UTF-8")


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train.main(tiny_args(tmp_path, "--epochs", "2", "--max_steps", "7"))
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(state, path):
        real_save({"half": torch.zeros(10)}, path)  # something got written, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tmp_path, "--epochs", "2", "--max_steps", "7"))
    message = str(stop.value)
    assert "could not write" in message and "No space left on device" in message
    assert "the previous last.pt is intact" in message and "free some disk space" in message
    assert (tmp_path / "last.pt").read_bytes() == before and not (tmp_path / "last.pt.tmp").exists()


def test_a_live_run_locks_its_run_dir_until_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *tiny_args(run_dir, "--epochs", "1000")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not first.stdout.readline().startswith("train:"):  # it holds the lock and is training
            assert first.poll() is None
        assert_one_line_error(run_script("train.py", *tiny_args(run_dir, "--epochs", "1")),
                              f"--run_dir {run_dir} is in use by another running train.py")
        first.kill()  # kill -9: no clean-up runs, the OS drops the lock
        first.wait()
        result = run_script("train.py", *tiny_args(run_dir, "--epochs", "1"))
        assert result.returncode == 0, result.stderr
    finally:
        first.kill()
        first.stdout.close()
