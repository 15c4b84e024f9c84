"""The one exception library code raises for what a user can fix (a flag, a file, the disk, a checkpoint), and
the one place that turns it into one line on stderr for the command-line scripts."""
import functools

import torch
import torch.distributed as dist


class RunError(Exception):
    """A failure the user can act on; its message says what happened and what to do, in one line."""


def one_line_errors(main):
    """A script's main() that exits with `error: <message>` and status 1 on a RunError, never a traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RunError as error:  # SystemExit prints its message on stderr and exits with status 1
            raise SystemExit(f"error: {error}") from None
    return wrapped


def explain_failure(error, rank, world_size, last_path):
    """The RunError that explains a failure the user can act on, or None: memory running out (the CPU
    allocator's "can't allocate memory", CUDA's OutOfMemoryError, Python's MemoryError), or, under torchrun,
    a collective that failed because another rank is gone (gloo: "Connection reset/closed by peer"; NCCL: a
    DistBackendError)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text:
        return RunError(f"out of memory ({text[:160]}); lower --max_tokens or --batch_size, or the model's size "
                        f"(--d_model, --d_ff, --n_layers, --vocab_size); {last_path} holds the last evaluation, "
                        "if any")
    if world_size > 1 and (isinstance(error, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "by peer"))):
        reason = text.split("] ", 1)[-1].split(". ")[0]
        return RunError(f"rank {rank} lost contact with another process of this run ({reason}): one of them died "
                        f"or was killed, and torchrun's report names which; {last_path} holds the last evaluation "
                        "or stop; continue with the same torchrun command and --resume auto")
    return None
