import json
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import batching
import step
import train
from conftest import EOS, ROOT, SOS, PAD, cpu_config, free_port, make_model, tiny_args
from runtime import Precision

CFG = cpu_config(dropout=0.0)
STEPS = 4


def examples(n, seed):
    generator = torch.Generator().manual_seed(seed)
    data = batching.TranslationDataset(
        [torch.randint(4, 40, (int(torch.randint(1, 9, (), generator=generator)),), generator=generator).tolist()
         for _ in range(n)],
        [torch.randint(4, 40, (int(torch.randint(1, 9, (), generator=generator)),), generator=generator).tolist()
         for _ in range(n)], SOS, EOS)
    return [data[i] for i in range(n)]


def rank_batches(step_number):
    """Per step, rank 0 and rank 1 get different numbers of sentences and tokens."""
    return examples(3, seed=2 * step_number), examples(5, seed=2 * step_number + 1)


def train_steps(model, batches_for_step, world_size):
    # SGD, not Adam: Adam turns the float noise of mathematically-zero gradients (attention key biases)
    # into lr-sized steps, which would hide what this test checks: DDP gradients equal one big batch's.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_model = DistributedDataParallel(model) if world_size > 1 else model
    for step_number in range(STEPS):
        batch = batching.collate(batches_for_step(step_number), PAD)
        step.train_step(step_model, [batch], optimizer, step.Schedule(scheduler), scaler,
                         Precision(torch.device("cpu")), CFG, PAD, world_size)


def ddp_worker(rank, world_size, port, out_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = make_model(seed=rank).train()  # different seeds: DDP must broadcast rank 0's weights
    train_steps(model, lambda number: rank_batches(number)[rank], world_size)
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_on_the_global_batch(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(ddp_worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    single = make_model(seed=0).train()
    train_steps(single, lambda number: [*rank_batches(number)[0], *rank_batches(number)[1]], world_size=1)
    ddp_state = torch.load(out_path)
    untrained = make_model(seed=0).state_dict()
    moved = max(float((value - untrained[name]).abs().max()) for name, value in single.state_dict().items())
    assert moved > 1e-2
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=0, atol=1e-6)


def test_torchrun_trains_on_two_cpu_processes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
                             *tiny_args(tmp_path, "--epochs", "1")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert "world size 2" in result.stdout and result.stdout.count("unique parameters") == 1


def test_resuming_with_another_number_of_processes_is_refused(tmp_path):
    train.main(tiny_args(tmp_path / "one", "--epochs", "1"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
                             *tiny_args(tmp_path / "two", "--epochs", "1", "--resume",
                                        str(tmp_path / "one" / "last.pt"))],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "written by a run of world size 1 but this run has world size 2" in result.stderr


def test_two_processes_agree_on_a_time_budget_and_its_refits(tmp_path):
    """--max_minutes: rank 0 times the steps and refits the schedule at every evaluation, and
    every rank takes its count, within epochs too; a rank left out of a broadcast would hang the run past the
    timeout."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
                             *tiny_args(tmp_path, "--epochs", "3", "--max_minutes", "5",
                                        "--eval_every_minutes", "0.0001")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["calibrated"] and checkpoint["step"] == checkpoint["total_steps"]
    # at every epoch's end (4 steps a rank), and within epochs where the ranks compare clocks (every --log_every 5)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [4, 5, 8, 10, 12]


def test_a_killed_peer_is_one_line_on_the_survivor(tmp_path):
    """kill -9 of one rank while both train: the other's collective fails; it says so in one line, with no
    traceback of its own (torchrun's report of the killed process follows, as torchrun writes it)."""
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                "--master_port", str(free_port()), os.path.join(ROOT, "train.py"),
                                *tiny_args(tmp_path, "--epochs", "1000")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not process.stdout.readline().startswith("step "):  # an evaluation: both ranks are in the loop
            assert process.poll() is None, process.stderr.read()[-3000:]
        ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(max(ranks, key=int)), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0 and not [line for line in stderr.splitlines()
                                            if line.startswith("[rank") and "Traceback" in line], stderr[-3000:]
    assert "lost contact with another process of this run" in stderr and "--resume auto" in stderr
