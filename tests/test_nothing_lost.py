"""Nothing deleted that the project did not write, nothing silently changed or ignored: export.py --force and
train.py --overwrite remove only what they wrote, a stopped export leaves no staging behind, resume sees a changed
--eval_files set, and translate.py neither ignores input nor splits a line anywhere but at "\\n"."""
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import export
import train
from conftest import FIXTURE, LEGACY_CHECKPOINT, ROOT, kept, one_line_failure, tiny_args, tree

pytest.importorskip("ctranslate2", reason="CTranslate2 is not installed (pip install ctranslate2)")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train.main(tiny_args(run_dir, "--epochs", "1", "--max_steps", "2"))
    return run_dir


@pytest.fixture
def workspace(tmp_path, trained_run, monkeypatch):
    """A working directory holding a user's notes, a run (runs/run) and a user's directory (mine/keep.txt)."""
    shutil.copytree(trained_run, tmp_path / "runs" / "run")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("target", ["runs/run", "runs", ".", "mine"])
def test_export_force_refuses_all_but_an_export_and_deletes_nothing(workspace, target, capsys):
    before = tree(workspace)
    err = one_line_failure(export.main, ["--checkpoint", "runs/run/last.pt", "--out", target, "--force", "true"],
                           capsys)
    assert "--force replaces only a directory export.py wrote" in err
    assert kept(before, workspace) and set(tree(workspace)) == set(before)


@pytest.mark.parametrize("target", ["runs/run", "runs", ".", "mine"])
def test_overwrite_removes_no_directory_in_the_place_of_a_run_file(workspace, target, capsys):
    """A directory named best.pt, holding a user's file, where --overwrite would remove the run's best.pt."""
    if os.path.exists(os.path.join(target, "best.pt")):
        os.remove(os.path.join(target, "best.pt"))
    os.mkdir(os.path.join(target, "best.pt"))
    open(os.path.join(target, "best.pt", "keep.txt"), "w").write("mine")
    before = tree(workspace)
    err = one_line_failure(train.main, tiny_args(target, "--epochs", "1", "--overwrite", "true"), capsys)
    assert "is not a file this project writes" in err
    assert kept(before, workspace)


def test_export_force_replaces_an_export_whole(tmp_path):
    out = tmp_path / "model"
    export.main(["--checkpoint", LEGACY_CHECKPOINT, "--out", str(out), "--quantization", "int8"])
    export.main(["--checkpoint", LEGACY_CHECKPOINT, "--out", str(out), "--force", "true"])
    assert '"quantization": "float32"' in (out / export.SETTINGS_FILE).read_text()
    assert os.listdir(tmp_path) == ["model"]  # no staging left beside it


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """A checkpoint of one shared block that export unrolls into 24 + 24 layers: about 180 MB to write, time
    enough for a signal to land mid-write."""
    run_dir = tmp_path_factory.mktemp("deep")
    train.main(tiny_args(run_dir, "--epochs", "1", "--max_steps", "1", "--d_model", "256", "--n_heads", "4",
                         "--d_ff", "1024", "--n_layers", "24", "--n_unique_layers", "1", "--n_eval_sentences", "0"))
    return str(run_dir / "last.pt")


def export_stopped_mid_write(checkpoint, out, signum):
    """Start export.py, send it signum once its staging directory holds part of model.bin; (returncode, stderr)."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", checkpoint,
                                "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        while not any(os.path.exists(os.path.join(out.parent, name, "model.bin")) for name in os.listdir(out.parent)
                      if name.startswith(f".{out.name}.")):
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.002)
        process.send_signal(signum)
        return process.wait(timeout=60), process.stderr.read()
    finally:
        process.kill()
        process.stderr.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_export_removes_its_staging(deep_checkpoint, tmp_path, signum):
    code, err = export_stopped_mid_write(deep_checkpoint, tmp_path / "model", signum)
    assert code == 128 + signum and err == f"export: stopped by {signal.Signals(signum).name}; nothing of " \
                                           f"{tmp_path / 'model'} was written\n"
    assert os.listdir(tmp_path) == []


def test_the_next_export_removes_the_staging_of_a_killed_one(deep_checkpoint, tmp_path):
    code, _ = export_stopped_mid_write(deep_checkpoint, tmp_path / "model", signal.SIGKILL)
    assert code == -signal.SIGKILL and len(os.listdir(tmp_path)) == 1  # its staging, left behind
    export.main(["--checkpoint", LEGACY_CHECKPOINT, "--out", str(tmp_path / "model")])
    assert os.listdir(tmp_path) == ["model"]


def test_a_live_exports_staging_and_a_users_directory_are_left_alone(tmp_path):
    live, users = tmp_path / ".model.abcd1234.staging", tmp_path / ".model.wxyz6789.staging"
    live.mkdir()
    (live / "model.bin").write_bytes(b"in progress")
    users.mkdir()
    (users / "keep.txt").write_text("mine")
    lock = os.open(live, os.O_RDONLY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a running export holds its own
    try:
        export.main(["--checkpoint", LEGACY_CHECKPOINT, "--out", str(tmp_path / "model")])
    finally:
        os.close(lock)
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, users.name, "model"])
    assert (live / "model.bin").read_bytes() == b"in progress" and (users / "keep.txt").read_text() == "mine"


def test_resuming_on_a_changed_eval_file_is_refused(tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(open(FIXTURE).readlines()[:20]))
    args = tiny_args(tmp_path / "run", "--epochs", "2", "--max_steps", "3", "--eval_files", str(held_out))
    train.main(args)
    held_out.write_text("".join(open(FIXTURE).readlines()[20:40]))
    with pytest.raises(SystemExit, match=r"the data has changed since .*last.pt was written \(the pairs in "
                                         r"--data_files or --eval_files"):
        train.main([*args, "--resume", "auto"])


def test_translate_eval_with_texts_is_one_line(checkpoint, capsys):
    import translate
    err = one_line_failure(translate.main, ["--checkpoint", checkpoint, "--eval", FIXTURE, "I am tired."], capsys)
    assert "--eval scores a file's translations" in err


def test_stdin_lines_split_only_at_newline(checkpoint):
    """One line in, one line out, whatever else a line holds: characters str.splitlines or bytes.splitlines
    would split at stay inside their line, and a Windows line ending is one ending."""
    lines = ["Tom is\rtired.", "I am\u2028here.", "Go\x85home.", "We\x0bwait.", "It\x0cends.", "Thank you.\r"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "translate.py"), "--checkpoint", checkpoint],
                            input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"\n") == len(lines) and result.stdout.endswith(b"\n")
