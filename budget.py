"""--max_minutes: how many steps a time budget holds. The first steps are timed, OneCycle is fitted into the time
left (warm-up included), refitted at every evaluation to the pace of the steps since the last one, and cut short
when the budget is spent anyway. Knows nothing about data or the model."""
import math

import torch
import torch.distributed as dist

from runtime import any_rank, synchronize

DEFAULT_EPOCHS = 10  # --epochs 0 (auto) without --max_minutes
CALIBRATION_STEPS = (20, 120)  # --max_minutes times the steps between these two (the first ones run slower)


def calibrate(trainer, progress, train_seconds):
    """--max_minutes: time steps 20-120 (a tenth to a fifth of a shorter run; training time only, at most a tenth
    of the budget) at the initial rate, then fit OneCycle into the time left (rank 0's count), warm-up included."""
    cfg, device = trainer.cfg, trainer.precision.device
    first = min(CALIBRATION_STEPS[0], max(1, progress.total_steps // 10))
    last = min(CALIBRATION_STEPS[1], max(first + 1, progress.total_steps // 5))
    if trainer.session_steps <= first:
        if trainer.session_steps == first:
            synchronize(device)
            trainer.calibration_start = train_seconds()
        return
    ended = trainer.session_steps >= last or train_seconds() - trainer.calibration_start >= cfg.max_minutes * 6
    if not any_rank([ended], trainer.world_size, device)[0]:
        return
    synchronize(device)
    spent = train_seconds()
    seconds_per_step = (spent - trainer.calibration_start) / (trainer.session_steps - first)
    total = steps_that_fit(trainer, progress, spent, seconds_per_step, at_least=2)
    trainer.schedule.start_over(cfg, total - progress.step)
    progress.total_steps, progress.calibrated = total, True


def refit_schedule(trainer, progress, interval_steps, interval_seconds, log):
    """--max_minutes, at each evaluation: later steps run faster or slower than the timed ones (a shared machine,
    longer batches, a warmer GPU), so fit the schedule's remaining steps into the time left at the pace of the
    steps since the last evaluation. OneCycle continues from where it is, stretched or shrunk; it never ends
    before its time or is cut off before its final rate."""
    if interval_steps < 1 or progress.step >= progress.total_steps:  # the same on every rank: all broadcast
        return
    pace = max(interval_seconds, 1e-9) / interval_steps  # seconds a step since the last evaluation
    total = steps_that_fit(trainer, progress, progress.train_seconds, pace, at_least=0)
    # no time left (the budget ends the run), or within a step or 1% of the plan (timing noise)
    if total <= progress.step or abs(total - progress.total_steps) <= max(1, total // 100):
        return
    log(f"schedule refitted to the time left: {progress.total_steps:,} → {total:,} steps "
        f"({pace * 1000:.0f} ms a step since the last evaluation)")
    trainer.schedule.refit(trainer.cfg, progress.total_steps, total, progress.step)
    progress.total_steps = total


def steps_that_fit(trainer, progress, spent_seconds, seconds_per_step, at_least):
    """The schedule's total: the steps taken, and at least `at_least` more, as many as the budget's time left holds
    at this pace, within --epochs/--max_steps. Rank 0's count on every rank (ranks time their own steps; the
    schedule must be one)."""
    remaining = trainer.cfg.max_minutes * 60 - spent_seconds
    total = min(trainer.step_limit, progress.step + max(at_least, int(remaining / seconds_per_step)))
    if trainer.world_size == 1:
        return total
    total = torch.tensor(total, device=trainer.precision.device)
    dist.broadcast(total, 0)
    return int(total)


def epoch_limit(cfg):
    """--epochs, or auto (0): DEFAULT_EPOCHS, or no limit with --max_minutes, whose time budget then decides."""
    return cfg.epochs or (math.inf if cfg.max_minutes else DEFAULT_EPOCHS)


def budget_spent(cfg, train_seconds):
    return bool(cfg.max_minutes) and train_seconds >= cfg.max_minutes * 60


def end_schedule_here(progress, log):
    """--max_minutes is spent (steps ran slower than timed): the schedule's last, lowest-rate steps are dropped."""
    log(f"time budget spent at step {progress.step:,} of the {progress.total_steps:,} planned")
    progress.total_steps = progress.step
