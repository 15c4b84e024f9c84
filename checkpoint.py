"""Everything a run keeps on disk: the run-directory lock, atomic writes, loading checkpoints (weights only),
resumability checks, restoring training state, and the RNG states of every rank.

Knows nothing about the training loop: it saves and restores what it is handed.
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pickle
import random
import shutil

import torch
import torch.distributed as dist

# Flags that may differ between a checkpoint and the run resuming it; any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "run_dir", "device", "amp", "num_workers", "compile", "log_every", "pad_multiple",
                     "n_eval_sentences", "beam", "length_penalty", "max_len_a", "max_len_b"}
CHECKPOINT_KEYS = ("model", "config", "tokenizers")  # what translate.py needs; resuming needs RESUME_KEYS too
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "ranks")  # and every field of train.Progress


@contextlib.contextmanager
def locked_run_dir(run_dir, is_main):
    """Create run_dir and hold an OS lock on it for the whole run. A second run on it is refused; the OS
    drops the lock when the process dies (even by kill -9), so no stale lock is ever left behind."""
    if not is_main:
        yield
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, ".lock"), "w")
    except OSError as error:
        raise SystemExit(f"error: cannot use --run_dir {run_dir}: {error.strerror}; pass a writable directory") \
            from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"error: --run_dir {run_dir} is in use by another running train.py; wait for it "
                             "or pass another --run_dir") from None
        yield


def write_or_explain(write, path):
    """Run write(temporary path), then rename it over path: a crash or a full disk at any moment leaves
    the previous file intact, and a failure is one line that says so."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written"
        hint = "free some disk space" if error.errno == errno.ENOSPC else "check the directory"
        raise SystemExit(f"error: could not write {path}: {error.strerror}; {kept}; {hint} and resume with "
                         "--resume auto") from None


def save_atomic(state, path):
    write_or_explain(lambda temporary: torch.save(state, temporary), path)


def copy_atomic(source, path):
    write_or_explain(lambda temporary: shutil.copyfile(source, temporary), path)


def write_lines_atomic(lines, path):
    """JSON lines (metrics.jsonl), replaced whole."""
    def write(temporary):
        with open(temporary, "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)
    write_or_explain(write, path)


def load_checkpoint(path, map_location="cpu", required=CHECKPOINT_KEYS):
    """A checkpoint written by train.py. weights_only=True: a file carrying pickled code is refused, never run."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: refusing to load {path}: it holds pickled Python objects, which could run code; "
                         "only checkpoints written by train.py load") from None
    except Exception as error:
        raise SystemExit(f"error: cannot read checkpoint {path}: truncated or corrupt "
                         f"({type(error).__name__})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py (it lacks {', '.join(missing)})")
    return checkpoint


def load_for_resume(cfg, last_path, world_size, progress_keys, log):
    """The checkpoint --resume names (auto: run_dir's last.pt, if any), checked to fit this run; else None."""
    resume_path = last_path if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.isfile(last_path):
        log(f"resume: no {last_path} yet, starting a new run")
        return None
    if not resume_path:
        return None
    checkpoint = load_checkpoint(resume_path, required=CHECKPOINT_KEYS + RESUME_KEYS + tuple(progress_keys))
    check_resumable(checkpoint, cfg, resume_path, world_size)
    log(f"resume: {resume_path} (epoch {checkpoint['epoch']}, batch {checkpoint['batch_in_epoch']}, "
        f"step {checkpoint['step']})")
    return checkpoint


def check_resumable(checkpoint, cfg, path, world_size):
    saved = checkpoint["config"]
    for name, value in dataclasses.asdict(cfg).items():
        if name not in RESUME_MAY_CHANGE and saved.get(name) != value:
            raise SystemExit(f"error: {path} was trained with --{name} {saved.get(name)} but this run has --{name} "
                             f"{value}; resume with the same value (the schedule, data and model must match) "
                             "or start a new --run_dir")
    if len(checkpoint["ranks"]) != world_size:
        raise SystemExit(f"error: {path} was written by a run of world size {len(checkpoint['ranks'])} but this "
                         f"run has world size {world_size}; resume with the same number of processes (torchrun "
                         "--nproc_per_node) because each process's data shard and the schedule length depend on it")


def restore(checkpoint, rank, model, optimizer, scheduler, scaler):
    """Load a checkpoint's training state, also on another device or precision than it was written on."""
    model.load_state_dict(checkpoint["model"])
    # load_state_dict copies the saved group options too; keep this run's kernel choice (fused on CUDA/CPU)
    kernel_options = [{k: group[k] for k in ("fused", "foreach", "capturable")} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])
    for group, options in zip(optimizer.param_groups, kernel_options):
        group.update(options)
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:  # a run without fp16 saved an empty scaler: start afresh
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["ranks"][rank])


def rank_states(world_size, device, partial_epoch):
    """Every rank's RNG states and running epoch sums: a resumed run then draws the same dropout masks
    and reports the same epoch loss as an uninterrupted one. CUDA: this process's own device only."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "partial": partial_epoch}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())
