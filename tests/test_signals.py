"""Stop signals sent to the whole process group, as `docker stop`, Kubernetes, Slurm and a terminal's Ctrl-C do,
with DataLoader workers running: the run saves, exits without a traceback, and resumes to the very metrics of a
run that was never stopped."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_metrics, tiny_args

# train.py with markers on stdout at every step, evaluation and loader-worker start, and slower steps, loader
# work and worker starts, so that a signal surely lands while the workers work, or while they start (before they
# could set their own signal handling); the sleeps change no number the run computes.
DRIVER = """
import sys, time
sys.path.insert(0, {root!r})
import batching, evaluation, runtime, step, train
real_step, real_evaluate, real_collate = step.train_step, evaluation.evaluate, batching.collate
real_start = runtime.leave_stopping_to_the_main_process

def start(worker_id):
    print("WORKER", flush=True)
    time.sleep(0.3)
    real_start(worker_id)

def slow_step(*args, **kwargs):
    result = real_step(*args, **kwargs)
    print("STEP", flush=True)
    time.sleep(0.05)
    return result

def evaluate(*args, **kwargs):
    print("EVAL", flush=True)
    return real_evaluate(*args, **kwargs)

def collate(*args, **kwargs):
    time.sleep(0.02)
    return real_collate(*args, **kwargs)

step.train_step, evaluation.evaluate, batching.collate = slow_step, evaluate, collate
runtime.leave_stopping_to_the_main_process = start
train.main(sys.argv[1:])
"""
# --amp auto would measure bf16 against fp32 in every run, and a busy machine can tip the runs apart
ARGS = ("--epochs", "2", "--dropout", "0.2", "--num_workers", "2", "--amp", "off")


def start(run_dir, *extra):
    return subprocess.Popen([sys.executable, "-c", DRIVER.format(root=ROOT), *tiny_args(run_dir, *ARGS, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    process = start(run_dir)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return read_metrics(run_dir)


@pytest.mark.parametrize("when", ["training", "evaluation"])
@pytest.mark.parametrize("signals", [[signal.SIGTERM], [signal.SIGINT, signal.SIGINT]], ids=["sigterm", "2xsigint"])
def test_a_stop_sent_to_the_process_group_saves_and_resumes_exactly(tmp_path, uninterrupted, when, signals):
    process = start(tmp_path)
    markers = ["STEP"] * 3 if when == "training" else ["EVAL", "WORKER"]  # the evaluation's workers starting
    for line in process.stdout:
        if markers and line.strip() == markers[0]:
            markers.pop(0)
        if not markers:
            break
    for i, signum in enumerate(signals):
        if i:
            time.sleep(0.05)
        os.killpg(process.pid, signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signals[0], err
    assert "Traceback" not in err and "Error" not in err, err
    assert "continue with --resume auto" in out
    stopped = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (stopped["batch_in_epoch"] > 0) == (when == "training")  # mid-epoch, or the evaluated epoch's end
    resumed = start(tmp_path, "--resume", "auto")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    lines = read_metrics(tmp_path)
    assert [line["step"] for line in lines] == [line["step"] for line in uninterrupted]
    for a, b in zip(uninterrupted, lines):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
