"""Where and how the numbers run: device and process group, precision, autocast, peak FLOP/s, synchronisation,
loader workers and stop signals.

Knows nothing about the data or the training loop.
"""
import contextlib
import dataclasses
import datetime
import functools
import math
import os
import signal
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from config import tokenizer_for
from errors import RunError

CPU_PROBE_SIZE = 1024  # the matrix product timed at start-up on a CPU: seconds of start-up, not minutes
CPU_SCREEN_SIZE = 256  # a first, small product: a CPU without bf16 units is 10-30x slower there already
PROBE_SECONDS = 1.0  # peak_flops stops repeating its product after this long (a slow dtype: after one product)
GPU_MAX_TOKENS = 16384  # --max_tokens auto on CUDA (docs/experiments.md, *A token budget on a GPU*)
BASE_LR, BASE_LR_TOKENS = 1e-3, 2048  # --lr auto: BASE_LR up to BASE_LR_TOKENS per batch, then x sqrt(tokens / it)
# --dropout auto on CUDA, whose runs see the data dozens of times (docs/experiments.md, *A token budget on a GPU*)
GPU_DROPOUT = 0.1


class Precision(NamedTuple):
    """Where a run computes and in which autocast dtype (None: full fp32)."""
    device: torch.device
    dtype: torch.dtype = None


def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets WORLD_SIZE; plain `python train.py` stays single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda but no CUDA device is available; use --device cpu")
    if world_size == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # Ranks wait in collectives while rank 0 trains tokenizers or evaluates: far longer than the 10-min default.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def resolve_autos(cfg, device, n_train_pairs=0):
    """The config with its auto fields (config.AUTO_VALUES) made concrete for this device and a training split of
    n_train_pairs: the tokenizer for that size (config.tokenizer_for), tied embeddings where the vocabulary is
    joint, a token budget on CUDA, where small batches leave the GPU idle,
    with batches of one fixed shape for CUDA graphs, and a peak rate raised with the square root of the batch
    (the gradient's noise falls as the batch grows), and dropout on CUDA only: a GPU's minutes train for dozens of
    epochs, where it pays; a CPU's ten minutes, a few, where it costs."""
    tokenizer = tokenizer_for(cfg.tokenizer, n_train_pairs)
    max_tokens = cfg.max_tokens if cfg.max_tokens >= 0 else GPU_MAX_TOKENS if device.type == "cuda" else 0
    batch_shape = cfg.batch_shape
    if batch_shape == "auto":
        batch_shape = "fixed" if device.type == "cuda" and cfg.batching == "packed" and max_tokens else "varied"
    lr = cfg.lr or BASE_LR * math.sqrt(max(1.0, max_tokens / BASE_LR_TOKENS))
    dropout = cfg.dropout if cfg.dropout >= 0 else GPU_DROPOUT if device.type == "cuda" else 0.0
    return dataclasses.replace(cfg, tokenizer=tokenizer, tie_embeddings=cfg.tie_embeddings and tokenizer == "bpe",
                               max_tokens=max_tokens, batch_shape=batch_shape, lr=lr, dropout=dropout)


def graph_obstacle(cfg, device, dtype, world_size):
    """Why the training step cannot be replayed as one CUDA graph here (None: it can). fp16's GradScaler decides
    on the host; DDP's and accumulation's steps are several graphs' worth; compile has graphs of its own. Every
    other number the captured step uses is either constant over the run or read from a device tensor (the rate)."""
    reasons = [(not cfg.cuda_graph, "--cuda_graph false"), (device.type != "cuda", "not on CUDA"),
               (cfg.batch_shape != "fixed", "batches of varied shapes (--batch_shape fixed)"),
               (dtype == torch.float16, "fp16 with GradScaler"), (world_size > 1, "several processes"),
               (cfg.accum_steps > 1, "--accum_steps above 1"), (cfg.compile, "--compile true"),
               (cfg.cycle_momentum, "--cycle_momentum true changes beta1, which a graph bakes in, at every step")]
    return next((reason for failed, reason in reasons if failed), None)


def amp_dtype(amp, device):
    """The autocast dtype for an --amp mode on this device, or None for full fp32. auto: bf16 on GPUs that
    support it (no GradScaler, no skipped steps), fp16 with GradScaler on older ones; on a CPU, bf16 only
    where its matrix products measurably beat fp32's (feature flags are not enough: a CPU with AVX512-BF16
    but no AMX multiplied bf16 at half its fp32 speed)."""
    if amp == "auto" and device.type == "cuda":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif amp == "auto":
        # a CPU whose bf16 products run at under half its fp32 speed at the small size has no bf16 units: the
        # large product, which takes it seconds, is not needed to tell
        faster = (peak_flops(device, torch.bfloat16, CPU_SCREEN_SIZE) > peak_flops(device, None, CPU_SCREEN_SIZE) / 2
                  and peak_flops(device, torch.bfloat16, CPU_PROBE_SIZE) > peak_flops(device, None, CPU_PROBE_SIZE))
        faster = torch.tensor(float(faster))
        if dist.is_initialized():  # every rank trains in the precision that rank 0 measured
            dist.broadcast(faster, 0)
        amp = "bf16" if faster else "off"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RunError("--amp bf16 is not supported on this GPU; use --amp fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def autocast(device, dtype, cache=True):
    """cache=False inside CUDA-graph capture, where autocast's cache of cast weights must not outlive the capture."""
    return (torch.autocast(device.type, dtype=dtype, cache_enabled=cache) if dtype is not None
            else contextlib.nullcontext())


def pad_multiple(cfg, device):
    """--pad_multiple 0: 8 on CUDA and for packed rows, so that batch widths take a few dozen values and
    kernels planned per shape (oneDNN's matrix products on a CPU, cuDNN's attention graphs, torch.compile)
    are planned a few dozen times, not for every other batch; 1 for unpacked batches on a CPU, whose short
    sentences rounding would pad by up to half."""
    return cfg.pad_multiple or (8 if device.type == "cuda" or cfg.batching == "packed" else 1)


def loader_workers(cfg, device):
    """--num_workers -1: two workers on CUDA, so that the next batches are collated while the GPU runs the
    step; none on a CPU, where the step needs every core."""
    return cfg.num_workers if cfg.num_workers >= 0 else (2 if device.type == "cuda" else 0)


@functools.cache
def peak_flops(device, dtype, size=None):
    """Measured FLOP/s of large matrix products in this dtype: the ceiling that fraction_of_peak divides by.
    None for fp16 on a CPU, which has no fp16 matrix units worth measuring (and takes minutes to try).
    Measured once per process for each (device, dtype, size)."""
    if device.type == "cpu" and dtype == torch.float16:
        return None
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device).manual_seed(0)  # the global RNG drives dropout: leave it alone
    a, b = (torch.rand(size, size, device=device, generator=generator).to(dtype or torch.float32) for _ in range(2))
    best, spent = float("inf"), 0.0
    for _ in range(10):  # the fastest of several: a busy machine only ever slows a product down
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
        spent += time.perf_counter() - started
        if spent > PROBE_SECONDS:
            break
    return 2 * size ** 3 / best


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def any_rank(flags, world_size, device):
    """Each flag, true if it is true on any rank: every rank must leave the loop at the same step."""
    if world_size == 1:
        return [bool(flag) for flag in flags]
    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.bool().tolist()


def catch_stop_signals(repeat_grace_seconds=2.0):
    """Ctrl-C / SIGTERM finish the current step, save and exit. Signals sent to a whole process group often
    come in bursts (a terminal, a scheduler's retries): repeats within `repeat_grace_seconds` of the first
    are the same request; one after that ends the process at once."""
    stop_signal, first_at = [], []

    def request_stop(signum, frame):
        if first_at and time.monotonic() - first_at[0] > repeat_grace_seconds:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        first_at[:] = first_at or [time.monotonic()]
        stop_signal.append(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop_signal


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_loader(loader):
    """iter(loader), its worker processes forked with the stop signals blocked. Only the main process decides
    when to stop: Ctrl-C or SIGTERM sent to the whole process group would otherwise kill the workers, and
    PyTorch would then raise in the main process wherever it was instead of letting it save. A fork inherits
    the mask but not the signals pending, so a worker is never hit before it ignores them; the main process
    gets a signal sent meanwhile once its workers are up."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextlib.contextmanager
def running_loader(loader):
    """start_loader(loader) for the length of a with-block, whose end, by an error too, shuts its worker processes
    down: they ignore SIGTERM, so the interpreter's exit, which terminates and then joins them, would wait forever
    for workers that an error left without the loader's own shutdown."""
    batches = start_loader(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # only a multi-process iterator has workers
        if shutdown is not None:
            shutdown()


def leave_stopping_to_the_main_process(worker_id):
    """A loader worker's first act: ignore the stop signals, then unblock them (see start_loader)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
