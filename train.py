"""Train the English->French translator: `python train.py [--field value ...]` (fields: config.py).

Multi-GPU: `torchrun --nproc_per_node=N train.py ...`. Resume: `--resume auto`.

Read top to bottom, it is the outline of a run: evaluation, the trainer, the one training loop, the epoch loop,
main(). The step itself is step.py's, the time budget budget.py's. For bench.py: `build_trainer`, `Trainer` and
`training_steps` (the loop).
"""
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import batching
import checkpoint as ckpt
import dataset
from averaging import WeightAverage
from budget import budget_spent, calibrate, end_schedule_here, epoch_limit, refit_schedule
from config import AUTO_MARKERS, AUTO_VALUES, MODEL_FIELDS, Config
from errors import RunError, explain_failure, one_line_errors
from evaluation import EvaluationFailed, end_interval, evaluation_due, evaluation_interval
from metrics import fraction_of_peak
from model import Transformer
from runtime import (CPU_PROBE_SIZE, Precision, amp_dtype, any_rank, catch_stop_signals, graph_obstacle, loader_workers,
                     pad_multiple, peak_flops, resolve_autos, running_loader, setup_distributed)
from step import GraphedStep, Schedule, eager_step, make_optimizer

UNSIZED_STEPS = 10 ** 9  # the schedule's length until --max_minutes has sized it (no epoch limit)
COUNTED_EPOCHS = 50  # epochs whose batches build_trainer counts; later ones are assumed as long as their mean
clock = time.perf_counter  # every duration train.py measures; tests inject their own
# GradScaler starts at 2**16; after this many skips in a row it is below 2**-8: fp16 then counts against nan_patience
FP16_SCALE_HALVINGS = 24

# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class Trainer:
    """What one training run works with, so the loop takes one argument instead of a dozen."""
    cfg: Config
    model: torch.nn.Module  # the plain module: trained, and evaluated and saved unless averaged
    train_model: torch.nn.Module  # the same, wrapped in DDP and/or compiled: trained
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    precision: tuple  # (device, autocast dtype or None)
    sampler: batching.BatchSampler
    data: dataset.Data
    rank: int
    world_size: int
    flops_per_token: float
    peak_flops: float  # None where not measured (other ranks, fp16 on a CPU)
    average: WeightAverage  # --ema_decay's moving average of model's weights (None: off)
    session_steps: int = 0  # steps taken by this process (a resumed run starts again at 0)
    bad_steps: int = 0  # consecutive skipped updates, across epochs
    calibration_start: float = None  # when --max_minutes started timing steps
    step_limit: int = UNSIZED_STEPS  # the most steps --epochs and --max_steps allow: --max_minutes fits within it
    step: object = None  # runs one optimizer step on a group of host batches: eager_step or a GraphedStep

    @property
    def translator(self):  # what is evaluated and saved to translate with: the moving average, if any, else model
        return self.model if self.average is None else self.average.module


def training_state(trainer, progress, sums):
    """A self-contained checkpoint of the run: the translating weights (and the trained ones when they are averaged),
    optimizer, schedule, scaler, progress, every rank's RNG states and running sums (a collective), config, data
    fingerprint and tokenizers."""
    averaged = {} if trainer.average is None else {"training_model": trainer.model.state_dict(),
                                                   "ema_updates": trainer.average.updates}
    return {"model": trainer.translator.state_dict(), **averaged,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.schedule.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            **dataclasses.asdict(progress),
            "ranks": ckpt.rank_states(trainer.world_size, trainer.precision.device, sums),
            "config": dataclasses.asdict(trainer.cfg), "data_fingerprint": trainer.data.fingerprint,
            "eval_fingerprint": trainer.data.eval_fingerprint,
            "tokenizers": [trainer.data.src_tokenizer.to_str(), trainer.data.tgt_tokenizer.to_str()]}


def resolved_autos(given, cfg, device):
    """Each flag the run was given at auto (its marker in --help), and the value it took: for this device and data,
    or a resumed run's checkpoint's."""
    autos = {**AUTO_VALUES, **{name: AUTO_MARKERS[name] for name in ("pad_multiple", "num_workers", "eval_every_minutes")}}
    taken = {**{name: getattr(cfg, name) for name in AUTO_VALUES}, "epochs": epoch_limit(cfg),
             "pad_multiple": pad_multiple(cfg, device), "num_workers": loader_workers(cfg, device),
             "eval_every_minutes": evaluation_interval(cfg) / 60}
    return {name: taken[name] for name, auto in autos.items() if getattr(given, name) == auto}


def build_trainer(cfg, data, checkpoint, rank, world_size, precision, log):
    """The model (wrapped for DDP / compile), optimizer, schedule, scaler and sampler of a run, restored from
    `checkpoint` when resuming; returns (trainer, progress)."""
    device = precision.device
    # epochs stays 0 (auto) and is read by epoch_limit; a tie is concrete either way; every other auto must be
    # concrete by now
    if any(getattr(cfg, name) == auto for name, auto in AUTO_VALUES.items()
           if name not in ("epochs", "tie_embeddings")):
        raise ValueError("build_trainer needs a config whose autos are resolved (runtime.resolve_autos)")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = Transformer(data.src_tokenizer.get_vocab_size(), data.tgt_tokenizer.get_vocab_size(), data.ids["pad"],
                        **{name: getattr(cfg, name) for name in MODEL_FIELDS}).to(device)
    total, unique = model.parameter_counts()
    log(f"model: {unique:,} unique parameters ({total:,} counting every use of shared layers and tied embeddings); "
        f"layers use blocks {model.layout} / {model.decoder_layout}")
    train_model = model
    if world_size > 1:  # the positions table never changes: no need to broadcast it before every forward
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    if cfg.compile:
        train_model = torch.compile(train_model)
    shape = (batching.fixed_shape(data.train.lengths(), cfg.max_tokens, cfg.pack_length, pad_multiple(cfg, device))
             if cfg.batch_shape == "fixed" else None)
    sampler = batching.make_sampler(cfg, data.train.lengths(), rank, world_size, shape=shape, groups=data.train_files)
    if sampler.draws is not None:
        names = [os.path.splitext(os.path.basename(path))[0] for path in dataset.data_file_paths(cfg.data_files)]
        log(f"sampling: temperature {cfg.sampling_temperature:g}, an epoch of {len(data.train):,} pairs draws "
            + ", ".join(f"{names[data.train_files[members[0]]]} {len(members):,} -> {count:,}"
                        for members, count in sampler.draws))
    epochs = epoch_limit(cfg)
    steps_per_epoch = count_steps(sampler, epochs, cfg.accum_steps, cfg.max_steps)
    # without an epoch limit --max_minutes sizes the run; until it has, the run is as long as it may be
    total_steps = sum(steps_per_epoch) if epochs < math.inf else UNSIZED_STEPS
    total_steps = min(cfg.max_steps, total_steps) if cfg.max_steps else total_steps
    progress = (ckpt.Progress(**{key: checkpoint[key] for key in ckpt.PROGRESS_KEYS}) if checkpoint
                else ckpt.Progress(total_steps))
    optimizer, scheduler = make_optimizer(cfg, model, device, progress.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    if checkpoint:
        ckpt.restore(checkpoint, rank, model, optimizer, scheduler, scaler, average)
    flops = model.training_flops_per_token(data.train.lengths())
    planned = f"{progress.total_steps:,} steps over {epochs} epochs"
    if progress.total_steps >= UNSIZED_STEPS:
        planned = f"steps sized by --max_minutes {cfg.max_minutes:g}"
    elif cfg.max_steps and progress.total_steps == cfg.max_steps < sum(steps_per_epoch):
        planned = f"{progress.total_steps:,} steps (--max_steps: {progress.total_steps / steps_per_epoch[0]:.2g} epochs)"
    elif cfg.max_minutes:
        planned += f", or fewer as --max_minutes {cfg.max_minutes:g} sizes them"
    log(f"train: {planned} (~{steps_per_epoch[0]:,} optimizer steps of {cfg.accum_steps} batch(es) per epoch"
        f"{' per rank' if world_size > 1 else ''}, {cfg.batching}), device {device}, "
        f"amp {precision.dtype or 'off (fp32)'}, {'world size ' + str(world_size) if world_size > 1 else 'single process'}"
        f", peak lr {cfg.lr:.3g}, dropout {cfg.dropout:g}, {flops / 1e6:.0f} MFLOP per token")
    # a smaller product than bench.py's: this one is start-up time of every run
    peak = peak_flops(*precision, size=CPU_PROBE_SIZE if device.type == "cpu" else 4096) if rank == 0 else None
    schedule = Schedule(scheduler, frozen=cfg.max_minutes > 0 and not progress.calibrated)
    trainer = Trainer(cfg, model, train_model, optimizer, schedule, scaler, precision, sampler, data, rank,
                      world_size, flops, peak, average, step_limit=total_steps)
    obstacle = graph_obstacle(cfg, device, precision.dtype, world_size)
    trainer.step = GraphedStep(trainer) if obstacle is None else functools.partial(eager_step, trainer)
    log(f"batches: {'%d rows of %d + %d tokens, every one' % shape if shape else 'rows of varied shape'}; "
        f"CUDA graph: {'on' if obstacle is None else 'off (' + obstacle + ')'}")
    return trainer, progress


def count_steps(sampler, epochs, accum_steps, max_steps):
    """Optimizer steps per epoch, for the schedule's length: every epoch's count up to COUNTED_EPOCHS (a token
    budget gives each epoch its own), the mean of those for the rest; only as many as --max_steps needs."""
    counts = []
    for epoch in range(min(epochs, COUNTED_EPOCHS) if epochs < math.inf else 1):
        sampler.set_epoch(epoch)
        counts.append(-(-len(sampler) // accum_steps))
        if max_steps and sum(counts) >= max_steps:
            return counts
    sampler.set_epoch(0)
    if epochs < math.inf and epochs > len(counts):
        counts += [round(sum(counts) / len(counts))] * int(epochs - len(counts))
    return counts


def cuda_graph_status(trainer):
    """Whether this trainer's steps replay as a CUDA graph: "captured", "failed: <reason>", "not yet captured",
    or "off: <why not>" (runtime.graph_obstacle)."""
    if isinstance(trainer.step, GraphedStep):
        return trainer.step.status
    return "off: " + graph_obstacle(trainer.cfg, trainer.precision.device, trainer.precision.dtype, trainer.world_size)


def training_steps(trainer, batches):
    """The one training loop (train_epoch's and bench.py's): one optimizer step per `accum_steps` batches, then
    the moving average, if any. Yields (the step's batches, summed loss, target tokens, verdicts, lr) per step."""
    batches = iter(batches)
    while True:
        group = [batch for _, batch in zip(range(trainer.cfg.accum_steps), batches)]
        if not group:
            return
        step = trainer.step(group)
        if trainer.average is not None:
            trainer.average.update(trainer.model)
        yield group, *step


def train_interval(trainer, progress, sums, stop_signal, writer, batches, bar):
    """Train from progress.batch_in_epoch until the epoch ends, an evaluation falls due (evaluation_interval), the
    schedule ends or a stop signal comes, taking batches from `batches`, the run's loader, and counting steps on
    `bar`, the run's. Returns the running sums since the last evaluation and why it stopped: "epoch" (its end),
    "schedule" (the schedule's, within the epoch), "evaluation" or "signal"."""
    cfg, (device, _), is_main = trainer.cfg, trainer.precision, trainer.rank == 0
    pad_id = trainer.data.ids["pad"]
    trainer.sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
    batches = itertools.islice(batches, len(trainer.sampler))
    loss_sum = torch.tensor(sums.loss, dtype=torch.float64, device=device)
    n_tokens = torch.tensor(sums.tokens, device=device)
    real_tokens, skipped, seconds_before = sums.real_tokens, sums.skipped, sums.seconds
    started = clock()
    of_epochs = f"/{epoch_limit(cfg)}" if epoch_limit(cfg) < math.inf else ""
    bar.set_description(f"epoch {progress.epoch + 1}{of_epochs}")
    ending, lr, epoch_batches = "epoch", 0.0, len(trainer.sampler.batches())
    patience = cfg.nan_patience + (FP16_SCALE_HALVINGS if trainer.scaler.is_enabled() else 0)
    steps = training_steps(trainer, batches) if progress.step < progress.total_steps else ()
    for group, step_loss, step_tokens, verdicts, lr in stoppable(steps, stop_signal):
        real_tokens += sum(int((b["src"] != pad_id).sum() + (b["labels"] != pad_id).sum()) for b in group)
        loss_sum += step_loss
        n_tokens += step_tokens
        progress.step += 1
        trainer.session_steps += 1
        progress.batch_in_epoch += len(group)
        bar.update()
        skipped += count_skips(trainer, verdicts, patience, progress.step)
        if cfg.max_minutes and not progress.calibrated:
            calibrate(trainer, progress, lambda: progress.train_seconds + clock() - started)
            if progress.calibrated:
                bar.total = progress.total_steps
        if is_main and logged(progress.step, cfg.log_every):  # reading the loss is a host sync: not every step
            loss = float(step_loss) / max(1, int(step_tokens))
            rate = (real_tokens - sums.real_tokens) / max(1e-9, clock() - started)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                                     peak=f"{fraction_of_peak(rate, trainer.flops_per_token, trainer.peak_flops) or 0:.0%}")
            for name, value in (("loss", loss), ("lr", lr), ("tokens_per_sec", rate)):
                writer.add_scalar(f"train/{name}", value, progress.step)
        # one process checks every step for free; ranks agree by an all-reduce, so only now and then
        due = False
        if trainer.world_size == 1 or progress.step % cfg.log_every == 0:
            interrupted, out_of_time, due = stop_now(
                cfg, stop_signal, progress.train_seconds + clock() - started, trainer.world_size, device,
                seconds_before + clock() - started >= evaluation_interval(cfg))
            if out_of_time:
                end_schedule_here(progress, say if is_main else lambda message: None)
                bar.total = progress.total_steps
            if interrupted:
                ending = "signal"
                break
        if progress.step >= progress.total_steps:
            break
        if due and progress.batch_in_epoch < epoch_batches:  # at the epoch's last step, its end evaluates
            ending = "evaluation"
            break
    if ending == "epoch" and progress.batch_in_epoch < epoch_batches:  # the schedule ended within the epoch
        ending = "schedule"
    if stop_signal:  # one that came after the last check, or that cut a step short (stoppable)
        ending = "signal"
    skipped += count_skips(trainer, trainer.schedule.settle(), patience, progress.step)
    seconds = clock() - started
    progress.elapsed_seconds += seconds
    progress.train_seconds += seconds
    return ckpt.Sums(float(loss_sum), int(n_tokens), real_tokens, seconds_before + seconds, skipped, lr), ending


def stop_now(cfg, stop_signal, train_seconds, world_size, device, *more):
    """The one decision to stop training, as every rank sees it: [a stop signal came, the time budget is spent
    after train_seconds, *more], each true where it is true on any rank."""
    return any_rank([bool(stop_signal), budget_spent(cfg, train_seconds), *more], world_size, device)


def stoppable(steps, stop_signal):
    """The steps, until one raises after a stop signal came: torch.compile's C++ build runs in child processes,
    which the signal kills too. The run then stops as at any signal, in the state of before that step (a compile
    fails before the step runs)."""
    try:
        yield from steps
    except Exception:
        if not stop_signal:
            raise


def say(message):
    """Log a line on stdout, above the progress bar. A stdout that fails (a reader that closed the pipe, a full
    disk) must not end the run or lose it: the log goes on, on stderr."""
    global log_file
    try:
        tqdm.write(message, file=log_file or sys.stdout)
        (log_file or sys.stdout).flush()
    except (OSError, AttributeError) as error:  # AttributeError: started with stdout closed, sys.stdout is None
        if sys.stdout is not None:  # nothing left in its buffer may be flushed again at exit (a traceback)
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        log_file = sys.stderr
        tqdm.write(f"warning: standard output failed ({getattr(error, 'strerror', None) or 'closed'}); the log "
                   "goes on here, and training goes on", file=log_file)
        tqdm.write(message, file=log_file)


log_file = None  # where say() writes once stdout has failed


def run_bar(progress, is_main):
    """The run's progress bar: steps out of the planned total (unknown until --max_minutes has sized it), with the
    whole run's ETA."""
    total = progress.total_steps if progress.total_steps < UNSIZED_STEPS else None
    return tqdm(total=total, initial=progress.step, unit="step", disable=not is_main, dynamic_ncols=True)


def logged(step, log_every):
    """Whether step's loss, rate and speed are shown: every log_every steps, and steps 1, 2, 4, 8... before the
    first of those, so that the first loss shows within seconds."""
    return step % log_every == 0 or (step < log_every and step & (step - 1) == 0)


def count_skips(trainer, verdicts, patience, step):
    """How many of these update verdicts were skips; stop after `patience` in a row."""
    skips = 0
    for stepped in verdicts:
        skips += not stepped
        trainer.bad_steps = 0 if stepped else trainer.bad_steps + 1
    if trainer.bad_steps >= patience:
        raise RunError(f"the loss or its gradients were not finite for {trainer.bad_steps} consecutive "
                       f"steps (last at step {step}); lower --lr (now {trainer.cfg.lr}) or check the data")
    return skips


def evaluate_and_save(trainer, progress, sums, best, paths, writer, log):
    """At an evaluation: refit --max_minutes' schedule, evaluate, save last.pt (and best.pt when it is the best so
    far), rewrite metrics.jsonl. Returns the best line."""
    cfg, is_main = trainer.cfg, trainer.rank == 0
    if cfg.max_minutes and progress.calibrated:
        last_evaluated = progress.history[-1]["step"] if progress.history else 0
        refit_schedule(trainer, progress, progress.step - last_evaluated, sums.seconds, log)
    line = end_interval(trainer, progress, sums, log, clock)  # EvaluationFailed: run()'s ending saves the training
    ckpt.save(training_state(trainer, progress, ckpt.Sums()), paths["last.pt"], is_main)
    if is_main:
        if best is None or ckpt.best_first(line) < ckpt.best_first(best):
            best = line
            ckpt.copy_atomic(paths["last.pt"], paths["best.pt"])
        ckpt.write_lines_atomic(progress.history, paths["metrics.jsonl"])
        for name in ("train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "tokens_per_sec", "fraction_of_peak",
                     *(key for key in line if "/" in key)):  # and --eval_files' "<set>/<metric>"
            if line.get(name) is not None:
                writer.add_scalar(f"eval/{name}", line[name], progress.step)
        writer.flush()
    if trainer.world_size > 1:
        dist.barrier()
    return best


# ---------------------------------------------------------------- the run

@one_line_errors
def main(argv=None):
    cfg = Config.from_args(argv)
    for path in dataset.data_file_paths(cfg.data_files) + cfg.eval_files:  # a path that names nothing stops
        dataset.check_data_file(path)  # before the run directory is touched
    if cfg.resume not in ("", "auto"):
        ckpt.check_checkpoint_path(cfg.resume, ckpt.RESUME_HINT)
    rank, world_size, device = setup_distributed(cfg)
    try:
        with ckpt.locked_run_dir(cfg.run_dir, rank == 0):
            run(cfg, rank, world_size, device)
    except KeyboardInterrupt:  # Ctrl-C before training starts; once it has, a stop saves (catch_stop_signals)
        raise SystemExit("interrupted during set-up, before any training: nothing was saved") from None
    except (RuntimeError, MemoryError) as error:
        explained = explain_failure(error, rank, world_size, os.path.join(cfg.run_dir, "last.pt"))
        if explained is None:
            raise
        raise explained from None
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, rank, world_size, device):
    """The outline of a run: set-up, resume, epochs (train, evaluate, save)."""
    started, given = time.perf_counter(), cfg
    is_main = rank == 0
    log = say if is_main else (lambda message: None)
    precision = Precision(device, amp_dtype(cfg.amp, device))
    paths = {name: os.path.join(cfg.run_dir, name) for name in ("last.pt", "best.pt", "metrics.jsonl")}
    checkpoint, resume_path, cfg = ckpt.load_for_resume(cfg, paths["last.pt"], world_size, log)
    ckpt.claim_run_dir(cfg.run_dir, resume_path, cfg.overwrite, is_main)
    tokenizers = ckpt.tokenizers_of(checkpoint, resume_path) if checkpoint else None
    data = dataset.prepare_shared_data(cfg, tokenizers, is_main, world_size, log)
    # by the device and the training split's size; a resumed run's autos are its checkpoint's values already
    cfg = resolve_autos(cfg, device, data.n_train_pairs)
    log("autos: " + ", ".join(f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
                              for name, value in resolved_autos(given, cfg, device).items()))
    if checkpoint:
        ckpt.check_same_data(checkpoint, data, resume_path)
        if is_main:
            ckpt.repair_best(checkpoint, resume_path, paths["best.pt"])
    if is_main:
        for language, tokenizer in ((cfg.lang_src, data.src_tokenizer), (cfg.lang_tgt, data.tgt_tokenizer)):
            ckpt.write_or_explain(tokenizer.save, os.path.join(cfg.run_dir, f"tokenizer_{language}.json"))
    trainer, progress = build_trainer(cfg, data, checkpoint, rank, world_size, precision, log)
    writer = None
    if is_main:  # metrics.jsonl always holds exactly the evaluations this run's state has made
        ckpt.write_lines_atomic(progress.history, paths["metrics.jsonl"])
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.run_dir, purge_step=progress.step if checkpoint else None)
    partial = ckpt.Sums.stored(checkpoint["ranks"][rank]["partial"]) if checkpoint else ckpt.Sums()
    stop_signal = catch_stop_signals()
    log(f"start-up: {time.perf_counter() - started:.1f} s to the first step")
    best = min(progress.history, key=ckpt.best_first, default=None)
    # why the run ends before its schedule does (None, "signal", or the failed evaluation), and whether last.pt lacks
    # some of the state: the one ending below reads both. A finished run resumed into another --run_dir saves there.
    stop, unsaved = None, resume_path != paths["last.pt"]
    # one loader, whose worker processes serve every epoch of the run; one bar for the whole run, in steps
    loader = batching.make_loader(data.train, trainer.sampler, cfg, data.ids["pad"], device,
                                  trainer.sampler.epochs_from(progress.epoch, progress.batch_in_epoch))
    with running_loader(loader) as batches, run_bar(progress, is_main) as bar:
        while progress.epoch < epoch_limit(cfg) and progress.step < progress.total_steps:
            # a signal that came during the last evaluation, or a budget spent by the last interval's steps
            signalled, out_of_time = stop_now(cfg, stop_signal, progress.train_seconds, world_size, device)
            if signalled:
                stop = "signal"
                break
            if out_of_time:
                end_schedule_here(progress, log)
                bar.total, unsaved = progress.total_steps, True
                break
            partial, ending = train_interval(trainer, progress, partial, stop_signal, writer, batches, bar)
            unsaved = True
            if ending == "signal":
                stop = "signal"
                break
            if ending == "epoch":
                progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
            if not evaluation_due(cfg, progress, partial, ending):
                continue  # the next metrics line covers this stretch too
            try:
                best = evaluate_and_save(trainer, progress, partial, best, paths, writer, log)
            except EvaluationFailed as error:
                stop = error
                break
            partial, unsaved, bar.total = ckpt.Sums(), False, progress.total_steps  # a refit may resize it
        if unsaved:  # inside the loader's block: saved after its shutdown, a stop sometimes resumed inexactly
            ckpt.save(training_state(trainer, progress, partial), paths["last.pt"], is_main)
    if writer:
        writer.close()
    if isinstance(stop, EvaluationFailed):
        raise RunError(f"evaluation at step {progress.step} failed ({stop}); {paths['last.pt']} holds the "
                       "training up to it; fix the evaluation flags (--beam, --length_penalty, --max_len_a/b, "
                       "--n_eval_sentences) and continue with --resume auto")
    if stop == "signal":
        log(f"interrupted at step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}); "
            f"{paths['last.pt']} holds it; continue with --resume auto")
        if world_size > 1:
            dist.barrier()
        raise SystemExit(128 + stop_signal[0] if stop_signal else 1)
    last = progress.history[-1] if progress.history else {}
    scores = ", ".join(f"{label} {last[name]:.4g}" for name, label in (("bleu", "validation BLEU"), ("val_loss", "val_loss"))
                       if last.get(name) is not None)
    log(f"done: translate with {os.path.abspath(paths['last.pt'])} (step {progress.step:,}{', ' + scores if scores else ''})"
        + (f"; {paths['best.pt']} holds the best evaluation, step {best['step']:,}"
           if best is not None and best["step"] != progress.step else ""))


if __name__ == "__main__":
    main()
