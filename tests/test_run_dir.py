"""What a run keeps in its --run_dir survives the user's mistakes and a full disk: a rerun never replaces a
finished run unless told to, every failed write is one line that says what is left, and a failed evaluation
costs only the evaluation."""
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import evaluation
import train
from conftest import FIXTURE, ROOT, crash, read_metrics, run_script, tiny_args


def assert_ends_in_one_line_error(result, *fragments):
    """A run that failed after training began: its progress bar came first on stderr, then one line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def saved_step(path):
    return torch.load(path, weights_only=True)["step"]


def test_a_rerun_on_a_finished_run_is_refused_and_loses_nothing(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--epochs", "2"))
    finished = {name: (tmp_path / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    step = saved_step(tmp_path / "last.pt")
    with pytest.raises(SystemExit) as stop:  # the rerun forgot --resume
        train.main(tiny_args(tmp_path, "--epochs", "1", "--max_steps", "1"))
    error = str(stop.value)
    assert error.startswith(f"error: --run_dir {tmp_path} holds another run (last.pt at step {step:,})"), error
    assert all(way in error for way in ("--resume auto", "another --run_dir", "--overwrite true")), error
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    train.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "auto"))  # continuing a finished run: nothing to do
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished


def test_overwrite_replaces_the_run_whole(tmp_path):
    train.main(tiny_args(tmp_path, "--epochs", "2"))
    old_events = {name for name in os.listdir(tmp_path) if name.startswith("events.out")}
    train.main(tiny_args(tmp_path, "--epochs", "1", "--max_steps", "1", "--overwrite", "true"))
    assert saved_step(tmp_path / "last.pt") == saved_step(tmp_path / "best.pt") == 1
    assert [line["step"] for line in read_metrics(tmp_path)] == [1]
    assert not old_events & set(os.listdir(tmp_path))  # the old run's curves are not mixed into the new one's


def test_the_quick_start_command_twice_keeps_the_first_runs_best_checkpoint(tmp_path):
    """The README's offline Quick start, run from a clone twice: the second run is refused, the first kept."""
    command = ["--data_files", FIXTURE, "--epochs", "1", "--device", "cpu", "--d_model", "32", "--n_heads", "2",
               "--d_ff", "32", "--n_layers", "1", "--n_unique_layers", "1", "--n_eval_sentences", "4"]
    run_dir = tmp_path / "runs" / "opus_books"  # the default --run_dir, relative to where the command runs
    shutil.copytree(ROOT, tmp_path / "clone", ignore=shutil.ignore_patterns("runs", ".git", "__pycache__"))
    first = subprocess.run([sys.executable, "train.py", *command, "--run_dir", str(run_dir)], cwd=tmp_path / "clone",
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    best = (run_dir / "best.pt").read_bytes()
    second = subprocess.run([sys.executable, "train.py", *command, "--run_dir", str(run_dir)],
                            cwd=tmp_path / "clone", capture_output=True, text=True)
    assert second.returncode == 1 and "holds another run" in second.stderr
    assert (run_dir / "best.pt").read_bytes() == best


@pytest.mark.parametrize("size, fails_at", [("8k", "tokenizer_fr.json"), ("600k", "last.pt"),
                                            ("1300k", "best.pt")])
def test_a_really_full_disk_is_one_line_and_resume_carries_on(small_tmpfs, size, fails_at):
    """A tmpfs that fills up while writing a tokenizer (tokenizers raise a plain Exception), a checkpoint
    (torch.save raises RuntimeError) or the copy of last.pt to best.pt (OSError)."""
    run_dir = small_tmpfs(size) / "run"
    args = tiny_args(run_dir, "--epochs", "1", "--max_steps", "7")
    result = run_script("train.py", *args)
    assert_ends_in_one_line_error(result, f"could not write {run_dir / fails_at}: no space left on the device",
                                  "free some disk space and resume with --resume auto")
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]
    if fails_at == "best.pt":  # last.pt was written whole before the copy failed
        assert saved_step(run_dir / "last.pt") == 7
    subprocess.run(["mount", "-o", "remount,size=8m", str(run_dir.parent)], check=True)
    assert run_script("train.py", *args, "--resume", "auto").returncode == 0
    assert saved_step(run_dir / "best.pt") == 7


def test_a_write_the_os_refuses_is_one_line_without_root(tmp_path):
    """Where no tmpfs can be mounted, a file-size limit makes the checkpoint's write really fail (EFBIG)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                             *tiny_args(tmp_path, "--epochs", "1", "--max_steps", "3")], cwd=ROOT,
                            capture_output=True, text=True, preexec_fn=limit_file_size)
    assert_ends_in_one_line_error(result, f"could not write {tmp_path / 'last.pt'}: ", "nothing was written")
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "last.pt.tmp").exists()


def test_a_directory_in_the_way_is_named_as_such(tmp_path):
    (tmp_path / "last.pt").mkdir()
    with pytest.raises(SystemExit, match=f"{tmp_path / 'last.pt'} is a directory, not a checkpoint; move it aside"):
        train.main(tiny_args(tmp_path, "--epochs", "1", "--resume", "auto"))
    (tmp_path / "elsewhere" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tmp_path / "elsewhere", "--epochs", "1"))
    error = str(stop.value)
    assert error.startswith(f"error: could not write {tmp_path / 'elsewhere' / 'metrics.jsonl'}: a directory"), error
    assert "--resume auto" in error


def test_a_failed_evaluation_keeps_the_training_before_it(tmp_path, monkeypatch, nth_call):
    """The second evaluation raises (as an overflowing length penalty once did): last.pt holds the training
    up to it, metrics.jsonl the first evaluation, and a resume continues from there."""
    nth_call(evaluation, "evaluate", 2, before=lambda: crash(OverflowError("(34, 'Numerical result out of range')")))
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tmp_path, "--epochs", "3"))
    first, = read_metrics(tmp_path)
    step = saved_step(tmp_path / "last.pt")
    assert str(stop.value).startswith(f"error: evaluation at step {step} failed (OverflowError: ")
    assert step == 2 * first["step"]  # the second epoch's training was saved
    monkeypatch.undo()
    train.main(tiny_args(tmp_path, "--epochs", "3", "--resume", "auto"))
    # the next evaluation's line covers the epoch whose evaluation failed too
    assert [line["step"] for line in read_metrics(tmp_path)] == [first["step"], 3 * first["step"]]
