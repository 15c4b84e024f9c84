"""Train the English->French translator: `python train.py [--field value ...]` (fields: config.py).

Multi-GPU: `torchrun --nproc_per_node=N train.py ...`. Resume: `--resume auto`.

Read top to bottom, it is the outline of a run: the step, the schedule bookkeeping, the one training loop,
evaluation, the epoch loop, main(). For bench.py: `build_trainer`, `Trainer`, `training_steps` (the loop),
`compute_loss`, `Schedule`, `make_scheduler`.
"""
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import checkpoint as ckpt
import dataset
from averaging import WeightAverage
from config import AUTO_VALUES, MODEL_FIELDS, Config
from model import Transformer, translate
from translate import score
from runtime import (CPU_PROBE_SIZE, any_rank, amp_dtype, autocast, catch_stop_signals, graph_obstacle, pad_multiple,
                     peak_flops, resolve_autos, setup_distributed, start_loader, synchronize)

DEFAULT_EPOCHS = 10  # --epochs 0 (auto) without --max_minutes
GRAPH_WARMUP_STEPS = 3  # eager steps before the training step is captured as a CUDA graph
UNSIZED_STEPS = 10 ** 9  # the schedule's length until --max_minutes has sized it (no epoch limit)
CALIBRATION_STEPS = (20, 120)  # --max_minutes times the steps between these two (the first ones run slower)
clock = time.perf_counter  # every duration train.py measures; tests inject their own
# GradScaler starts at 2**16; after this many skips in a row it is below 2**-8: fp16 then counts against nan_patience
FP16_SCALE_HALVINGS = 24


# ---------------------------------------------------------------- one step

def compute_loss(logits, labels, pad_id, label_smoothing):
    """Summed label-smoothed cross-entropy over real target tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


class Schedule:
    """Advances OneCycle once per optimizer update that really happened. On CUDA fused AdamW skips a non-finite
    update on the device (told by the GradScaler under fp16, by found_inf otherwise); the verdict is copied to
    the host without waiting and read at the next step, when the GPU has long finished: every update gets the
    rate an immediate check gives, and no step waits for the GPU. On a CPU bf16/fp32 check at once (a bool)."""

    def __init__(self, scheduler, frozen=False):
        self.scheduler, self.pending, self.verdict, self.event = scheduler, False, None, None
        self.frozen = frozen  # holds the initial rate while --max_minutes measures the step time

    def record(self, stepped):
        """This step's verdict: a bool (decided now) or a device tensor (read at the next settle)."""
        if isinstance(stepped, bool):
            if stepped and not self.frozen:
                self.scheduler.step()
            return stepped
        if self.verdict is None:  # one page-locked host tensor, allocated once: the copy never waits
            self.verdict = torch.empty((), dtype=torch.bool, pin_memory=stepped.is_cuda)
            self.event = torch.cuda.Event() if stepped.is_cuda else None
        self.verdict.copy_(stepped, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True
        return None

    def settle(self):
        """Apply the pending verdict, if any; returns it (None when nothing was pending)."""
        if not self.pending:
            return None
        if self.event is not None:
            self.event.synchronize()
        stepped, self.pending = bool(self.verdict), False
        if stepped and not self.frozen:
            self.scheduler.step()
        return stepped


def forward_backward(model, batches, optimizer, scaler, precision, cfg, pad_id, world_size=1, cache_casts=True):
    """Forward and backward over one step's batches, then unscaling and clipping; returns (summed loss, target
    tokens, whether the gradients are finite), all on the device. Every batch's loss is divided by the target
    tokens of all the step's batches on all ranks, so accumulation and DDP's gradient averaging give exactly the
    gradient of one big batch. cache_casts=False under CUDA-graph capture (see runtime.autocast)."""
    device, dtype = precision
    n_tokens = sum((batch["labels"] != pad_id).sum() for batch in batches)
    global_tokens = n_tokens.clone()
    if world_size > 1:
        dist.all_reduce(global_tokens)
    loss_sum = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        # DDP all-reduces gradients once per step, on the last batch, not once per batch
        no_sync = model.no_sync() if world_size > 1 and not last else contextlib.nullcontext()
        with no_sync:
            with autocast(device, dtype, cache_casts):
                logits = model(batch["src"], batch["tgt_in"], batch.get("src_segments"), batch.get("tgt_segments"))
            batch_loss = compute_loss(logits, batch["labels"], pad_id, cfg.label_smoothing)
            scaler.scale(batch_loss * world_size / global_tokens).backward()
        loss_sum += batch_loss.detach()
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return loss_sum, n_tokens, torch.isfinite(grad_norm)


def apply_update(optimizer, scaler, finite, device):
    """The optimizer step, skipped when the gradients are not finite (fp16 overflow, or a NaN in any precision).
    On CUDA fused AdamW skips it on the device, told by the GradScaler under fp16 and by found_inf otherwise, so
    nothing waits for the GPU (returns None); on a CPU the check is immediate (returns whether it stepped)."""
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        return None
    if device.type == "cuda":
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        del optimizer.found_inf
        return None
    stepped = bool(finite)
    if stepped:
        optimizer.step()
    return stepped


def train_step(model, batches, optimizer, schedule, scaler, precision, cfg, pad_id, world_size=1):
    """One optimizer step over one or more batches (gradient accumulation). Returns (summed loss, target tokens,
    verdicts, lr): verdicts lists whether the updates settled by this call happened (see Schedule), lr the rate
    this update used. A skipped update leaves weights and schedule untouched."""
    loss_sum, n_tokens, finite = forward_backward(model, batches, optimizer, scaler, precision, cfg, pad_id,
                                                  world_size)
    verdicts = [schedule.settle()]  # after this step's work is queued: the last step's verdict has long landed
    lr = optimizer.param_groups[0]["lr"]
    stepped = apply_update(optimizer, scaler, finite, precision[0])
    verdicts.append(schedule.record(finite if stepped is None else stepped))
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens, [v for v in verdicts if v is not None], lr


def eager_step(trainer, group):
    """train_step on a group of host batches, as PyTorch runs it: one kernel launch per operation."""
    device = trainer.precision[0]
    on_device = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in group]
    return train_step(trainer.train_model, on_device, trainer.optimizer, trainer.schedule, trainer.scaler,
                      trainer.precision, trainer.cfg, trainer.data.ids["pad"], trainer.world_size)


class GraphedStep:
    """train_step replayed as one CUDA graph: a thousand kernel launches become one, so the GPU no longer waits
    for Python between kernels. The first GRAPH_WARMUP_STEPS steps run eagerly (they create the optimizer's
    state and let cuBLAS and SDPA pick their kernels), the next is captured, and from then on each step copies
    its batch into the graph's input tensors and replays it. Batches must all have one shape (--batch_shape
    fixed). The optimizer reads its rate from a device tensor filled before each replay, so the schedule stays
    on the host as in eager steps; fused AdamW skips a non-finite update inside the graph (found_inf). Should
    the capture fail (an operation CUDA cannot record, on some GPU or library version), the run says so and
    goes on with eager steps."""

    def __init__(self, trainer):
        self.trainer, self.eager_steps, self.graph, self.failed = trainer, 0, None, False

    def __call__(self, group):
        trainer, (batch,) = self.trainer, group
        if self.eager_steps < GRAPH_WARMUP_STEPS or self.failed:
            self.eager_steps += 1
            return eager_step(trainer, group)
        if self.graph is None:
            try:
                self.capture(batch)
            except RuntimeError as error:
                self.failed, self.graph = True, None
                trainer.optimizer.zero_grad(set_to_none=True)
                tqdm.write(f"warning: capturing the training step as a CUDA graph failed ({error}); training "
                           "goes on without (--cuda_graph false)")
                return eager_step(trainer, group)
        for name, tensor in self.inputs.items():
            if tensor.shape != batch[name].shape:
                raise ValueError(f"a CUDA graph replays one batch shape: {tuple(batch[name].shape)} is not "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(batch[name], non_blocking=True)
        verdicts = [trainer.schedule.settle()]
        lr = trainer.optimizer.param_groups[0]["lr"]
        self.lr.fill_(lr)
        self.graph.replay()
        verdicts.append(trainer.schedule.record(self.finite))
        return self.loss_sum, self.n_tokens, [v for v in verdicts if v is not None], lr

    def capture(self, batch):
        trainer = self.trainer
        device = trainer.precision[0]
        self.inputs = {name: tensor.to(device) for name, tensor in batch.items()}
        groups = trainer.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        self.lr = torch.tensor(rates[0], device=device)
        for group in groups:  # only while capturing: checkpoints keep a plain optimizer
            group["lr"], group["capturable"] = self.lr, True
        trainer.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        try:  # thread_local: the loader's pinning thread may allocate meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss_sum, self.n_tokens, self.finite = forward_backward(
                    trainer.train_model, [self.inputs], trainer.optimizer, trainer.scaler, trainer.precision,
                    trainer.cfg, trainer.data.ids["pad"], cache_casts=False)
                apply_update(trainer.optimizer, trainer.scaler, self.finite, device)
        finally:
            for group, rate in zip(groups, rates):
                group["lr"], group["capturable"] = rate, False


def make_optimizer(cfg, model, device, total_steps):
    """AdamW (fused into a few kernels where PyTorch has them, CPU included) and the OneCycle schedule."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    return optimizer, make_scheduler(cfg, optimizer, total_steps)


def make_scheduler(cfg, optimizer, total_steps):
    # OneCycle's phases each need a step or more: very short runs warm up over at least 1.5 steps.
    pct_start = min(0.45, max(cfg.pct_start, 1.5 / total_steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=cfg.anneal_strategy,
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, three_phase=cfg.three_phase)


# ---------------------------------------------------------------- validation

@torch.no_grad()
def evaluate(model, data, cfg, precision):
    """Teacher-forced loss on the whole validation split, then BLEU/chrF/CER/WER on translated sentences."""
    device, dtype = precision
    model.eval()
    pad_id = data.ids["pad"]
    batches = start_loader(dataset.make_loader(data.val, dataset.make_sampler(cfg, data.val.lengths(), shuffle=False),
                                               cfg, pad_id, device))
    loss_sum, n_tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, dtype):
            logits = model(batch["src"], batch["tgt_in"])
        loss_sum += compute_loss(logits, batch["labels"], pad_id, cfg.label_smoothing)
        n_tokens += (batch["labels"] != pad_id).sum()
    n = min(cfg.n_eval_sentences, len(data.val))
    with autocast(device, dtype):
        outputs = translate(model, data.val.src_ids[:n], data.ids["sos"], data.ids["eos"], cfg.beam,
                            cfg.length_penalty, cfg.max_len_a, cfg.max_len_b)
    hypotheses = [dataset.decode(data.tgt_tokenizer, ids, cfg.tokenizer == "word") for ids in outputs]
    references = [target for _, target in data.val_pairs[:n]]
    model.train()
    metrics = {"val_loss": float(loss_sum) / max(1, int(n_tokens))}
    if n:
        metrics.update(score(hypotheses, references))
    examples = [(data.val_pairs[i][0], references[i], hypotheses[i]) for i in range(min(2, n))]
    return metrics, examples


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
    sampler: dataset.BatchSampler
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


def new_epoch_sums():  # what an epoch (or the epochs since the last evaluation) adds up
    return {"loss": 0.0, "tokens": 0, "real_tokens": 0, "seconds": 0.0, "skipped": 0}


def build_trainer(cfg, data, checkpoint, rank, world_size, precision, log):
    """The model (wrapped for DDP / compile), optimizer, schedule, scaler and sampler of a run, restored from
    `checkpoint` when resuming; returns (trainer, progress)."""
    device = precision[0]
    # epochs stays 0 (auto) and is read by epoch_limit; every other auto must be concrete by now
    if any(getattr(cfg, name) == auto for name, auto in AUTO_VALUES.items() if name != "epochs"):
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
    shape = (dataset.fixed_shape(data.train.lengths(), cfg.max_tokens, cfg.pack_length, pad_multiple(cfg, device))
             if cfg.batch_shape == "fixed" else None)
    sampler = dataset.make_sampler(cfg, data.train.lengths(), rank, world_size, shape=shape)
    epochs = epoch_limit(cfg)
    steps_per_epoch = []
    for epoch in range(epochs if epochs < math.inf else 1):
        sampler.set_epoch(epoch)
        steps_per_epoch.append(-(-len(sampler) // cfg.accum_steps))
    # without an epoch limit --max_minutes sizes the run; until it has, the run is as long as it may be
    total_steps = sum(steps_per_epoch) if epochs < math.inf else UNSIZED_STEPS
    total_steps = min(cfg.max_steps, total_steps) if cfg.max_steps else total_steps
    progress = (ckpt.Progress(**{key: checkpoint[key] for key in ckpt.PROGRESS_KEYS}) if checkpoint
                else ckpt.Progress(total_steps))
    optimizer, scheduler = make_optimizer(cfg, model, device, progress.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision[1] == torch.float16)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    if checkpoint:
        ckpt.restore(checkpoint, rank, model, optimizer, scheduler, scaler, average)
    flops = model.training_flops_per_token(data.train.lengths())
    planned = (f"{progress.total_steps:,} steps{' (to be sized by --max_minutes)' if cfg.max_minutes else ''} over "
               f"{epochs} epochs" if progress.total_steps < UNSIZED_STEPS else "steps sized by --max_minutes")
    log(f"train: {planned} (~{steps_per_epoch[0]:,} optimizer steps of {cfg.accum_steps} batch(es) per epoch"
        f"{' per rank' if world_size > 1 else ''}, {cfg.batching}), device {device}, "
        f"amp {precision[1] or 'off (fp32)'}, {'world size ' + str(world_size) if world_size > 1 else 'single process'}"
        f", peak lr {cfg.lr:.3g}, dropout {cfg.dropout:g}, {flops / 1e6:.0f} MFLOP per token")
    # a smaller product than bench.py's: this one is start-up time of every run
    peak = peak_flops(*precision, size=CPU_PROBE_SIZE if device.type == "cpu" else 4096) if rank == 0 else None
    schedule = Schedule(scheduler, frozen=cfg.max_minutes > 0 and not progress.calibrated)
    trainer = Trainer(cfg, model, train_model, optimizer, schedule, scaler, precision, sampler, data, rank,
                      world_size, flops, peak, average, step_limit=total_steps)
    obstacle = graph_obstacle(cfg, device, precision[1], world_size)
    trainer.step = GraphedStep(trainer) if obstacle is None else functools.partial(eager_step, trainer)
    log(f"batches: {'%d rows of %d + %d tokens, every one' % shape if shape else 'rows of varied shape'}; "
        f"CUDA graph: {'on' if obstacle is None else 'off (' + obstacle + ')'}")
    return trainer, progress


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


def calibrate(trainer, progress, train_seconds):
    """--max_minutes: time steps 20-120 (a tenth to a fifth of a shorter run; training time only, at most a tenth
    of the budget) at the initial rate, then fit OneCycle into the time left (rank 0's count), warm-up included."""
    cfg, device = trainer.cfg, trainer.precision[0]
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
    trainer.schedule.settle()
    progress.total_steps, progress.calibrated = total, True
    trainer.schedule.scheduler = make_scheduler(cfg, trainer.optimizer, progress.total_steps - progress.step)
    trainer.schedule.frozen = False


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
    scheduler = trainer.schedule.scheduler
    start = progress.total_steps - scheduler.total_steps  # the step OneCycle started at, when timing ended
    trainer.schedule.settle()
    log(f"schedule refitted to the time left: {progress.total_steps:,} → {total:,} steps "
        f"({pace * 1000:.0f} ms a step since the last evaluation)")
    progress.total_steps = total
    scheduler = make_scheduler(trainer.cfg, trainer.optimizer, total - start)
    scheduler.last_epoch = progress.step - start - 1
    scheduler.step()  # sets the rate of the next step on the new curve
    trainer.schedule.scheduler = scheduler


def steps_that_fit(trainer, progress, spent_seconds, seconds_per_step, at_least):
    """The schedule's total: the steps taken, and at least `at_least` more, as many as the budget's time left holds
    at this pace, within --epochs/--max_steps. Rank 0's count on every rank (ranks time their own steps; the
    schedule must be one)."""
    remaining = trainer.cfg.max_minutes * 60 - spent_seconds
    total = min(trainer.step_limit, progress.step + max(at_least, int(remaining / seconds_per_step)))
    if trainer.world_size == 1:
        return total
    total = torch.tensor(total, device=trainer.precision[0])
    dist.broadcast(total, 0)
    return int(total)


def train_epoch(trainer, progress, sums, stop_signal, writer, batches):
    """Train from progress.batch_in_epoch to the end of the epoch (or of the schedule, or a stop signal), taking
    this epoch's batches from `batches`, the run's loader. Returns the epoch's running sums and whether a signal
    interrupted it."""
    cfg, (device, _), is_main = trainer.cfg, trainer.precision, trainer.rank == 0
    pad_id = trainer.data.ids["pad"]
    trainer.sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
    batches = itertools.islice(batches, len(trainer.sampler))
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=device)
    n_tokens = torch.tensor(sums["tokens"], device=device)
    real_tokens, skipped, seconds_before = sums["real_tokens"], sums["skipped"], sums["seconds"]
    started = clock()
    of_epochs = f"/{epoch_limit(cfg)}" if epoch_limit(cfg) < math.inf else ""
    progress_bar = tqdm(total=progress.batch_in_epoch + len(trainer.sampler), initial=progress.batch_in_epoch,
                        desc=f"epoch {progress.epoch + 1}{of_epochs}", disable=not is_main, dynamic_ncols=True)
    interrupted, lr = False, 0.0
    patience = cfg.nan_patience + (FP16_SCALE_HALVINGS if trainer.scaler.is_enabled() else 0)
    steps = training_steps(trainer, batches) if progress.step < progress.total_steps else ()
    for group, step_loss, step_tokens, verdicts, lr in steps:
        real_tokens += sum(int((b["src"] != pad_id).sum() + (b["labels"] != pad_id).sum()) for b in group)
        loss_sum += step_loss
        n_tokens += step_tokens
        progress.step += 1
        trainer.session_steps += 1
        progress.batch_in_epoch += len(group)
        progress_bar.update(len(group))
        skipped += count_skips(trainer, verdicts, patience, progress.step)
        if cfg.max_minutes and not progress.calibrated:
            calibrate(trainer, progress, lambda: progress.train_seconds + clock() - started)
        if progress.step % cfg.log_every == 0 and is_main:  # reading the loss is a host sync: not every step
            loss = float(step_loss) / max(1, int(step_tokens))
            rate = (real_tokens - sums["real_tokens"]) / max(1e-9, clock() - started)
            progress_bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                                     peak=f"{fraction_of_peak(trainer, rate) or 0:.0%}")
            for name, value in (("loss", loss), ("lr", lr), ("tokens_per_sec", rate)):
                writer.add_scalar(f"train/{name}", value, progress.step)
        # one process checks every step for free; ranks agree by an all-reduce, so only now and then
        if trainer.world_size == 1 or progress.step % cfg.log_every == 0:
            out_of_time = budget_spent(cfg, progress.train_seconds + clock() - started)
            interrupted, out_of_time = any_rank([bool(stop_signal), out_of_time], trainer.world_size, device)
            if out_of_time:
                end_schedule_here(progress, progress_bar.write if is_main else lambda message: None)
            if interrupted:
                break
        if progress.step >= progress.total_steps:
            break
    skipped += count_skips(trainer, [trainer.schedule.settle()], patience, progress.step)
    progress_bar.close()
    seconds = clock() - started
    progress.elapsed_seconds += seconds
    progress.train_seconds += seconds
    sums = {"loss": float(loss_sum), "tokens": int(n_tokens), "real_tokens": real_tokens,
            "seconds": seconds_before + seconds, "skipped": skipped, "lr": lr}
    return sums, interrupted


def epoch_limit(cfg):
    """--epochs, or auto (0): DEFAULT_EPOCHS, or no limit with --max_minutes, whose time budget then decides."""
    return cfg.epochs or (math.inf if cfg.max_minutes else DEFAULT_EPOCHS)


def budget_spent(cfg, train_seconds):
    return bool(cfg.max_minutes) and train_seconds >= cfg.max_minutes * 60


def end_schedule_here(progress, log):
    """--max_minutes is spent (steps ran slower than timed): the schedule's last, lowest-rate steps are dropped."""
    log(f"time budget spent at step {progress.step:,} of the {progress.total_steps:,} planned")
    progress.total_steps = progress.step


def fraction_of_peak(trainer, tokens_per_sec):
    """Achieved matmul FLOP/s over the measured peak (model FLOPs utilisation), or None where unmeasured."""
    return tokens_per_sec * trainer.flops_per_token / trainer.peak_flops if trainer.peak_flops else None


def count_skips(trainer, verdicts, patience, step):
    """How many of these update verdicts (None: none settled) were skips; stop after `patience` in a row."""
    skips = 0
    for stepped in filter(lambda verdict: verdict is not None, verdicts):
        skips += not stepped
        trainer.bad_steps = 0 if stepped else trainer.bad_steps + 1
    if trainer.bad_steps >= patience:
        raise SystemExit(f"error: the loss or its gradients were not finite for {trainer.bad_steps} consecutive "
                         f"steps (last at step {step}); lower --lr (now {trainer.cfg.lr}) or check the data")
    return skips


def evaluation_due(cfg, progress, sums):
    """At an epoch's end: evaluate (and save) at the run's end or after --eval_every_minutes of training (auto:
    every epoch, or ten times in --max_minutes), so short epochs (a GPU's) do not spend more time evaluating."""
    interval = cfg.eval_every_minutes or cfg.max_minutes / 10
    return (progress.epoch >= epoch_limit(cfg) or progress.step >= progress.total_steps or
            budget_spent(cfg, progress.train_seconds) or sums["seconds"] >= interval * 60)


def end_interval(trainer, progress, sums, log):
    """Combine the ranks' sums since the last evaluation, evaluate on rank 0, append the metrics line."""
    device = trainer.precision[0]
    loss_sum, n_tokens, real_tokens = sums["loss"], sums["tokens"], sums["real_tokens"]
    if trainer.world_size > 1:
        totals = torch.tensor([loss_sum, n_tokens, real_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, n_tokens, real_tokens = float(totals[0]), int(totals[1]), int(totals[2])
    started = clock()
    metrics = {}
    if trainer.rank == 0:
        metrics, examples = evaluate(trainer.translator, trainer.data, trainer.cfg, trainer.precision)
        for source, reference, hypothesis in examples:
            log(f"  source:      {source}\n  reference:   {reference}\n  translation: {hypothesis}")
    eval_seconds = clock() - started
    progress.elapsed_seconds += eval_seconds
    tokens_per_sec = real_tokens / max(1e-9, sums["seconds"])
    line = {"epoch": progress.epoch, "step": progress.step, "train_loss": loss_sum / max(1, n_tokens),
            "weights": "raw" if trainer.average is None else "ema", **metrics,
            "lr": sums["lr"], "tokens_per_sec": tokens_per_sec,
            "fraction_of_peak": fraction_of_peak(trainer, tokens_per_sec),
            "epoch_seconds": sums["seconds"], "eval_seconds": eval_seconds,
            "elapsed_seconds": progress.elapsed_seconds, "skipped_steps": sums["skipped"]}
    progress.history.append(line)
    log(f"epoch {progress.epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in line.items() if k != "epoch"))
    return line


# ---------------------------------------------------------------- the run

def main(argv=None):
    cfg = Config.from_args(argv)
    rank, world_size, device = setup_distributed(cfg)
    try:
        with ckpt.locked_run_dir(cfg.run_dir, rank == 0):
            run(cfg, rank, world_size, device)
    except KeyboardInterrupt:  # Ctrl-C before training starts; once it has, a stop saves (catch_stop_signals)
        raise SystemExit("interrupted during set-up, before any training: nothing was saved") from None
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, rank, world_size, device):
    """The outline of a run: set-up, resume, epochs (train, evaluate, save)."""
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    precision = (device, amp_dtype(cfg.amp, device))
    paths = {name: os.path.join(cfg.run_dir, name) for name in ("last.pt", "best.pt", "metrics.jsonl")}
    checkpoint, resume_path, cfg = ckpt.load_for_resume(cfg, paths["last.pt"], world_size, log)
    cfg = resolve_autos(cfg, device)  # a resumed run's autos are its checkpoint's values already
    tokenizers = ckpt.tokenizers_of(checkpoint, resume_path) if checkpoint else None
    data = dataset.prepare_shared_data(cfg, tokenizers, is_main, world_size, log)
    if checkpoint:
        ckpt.check_same_data(checkpoint, data.fingerprint, resume_path)
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
    partial = checkpoint["ranks"][rank]["partial"] if checkpoint else new_epoch_sums()
    stop_signal = catch_stop_signals()
    best = min(progress.history, key=ckpt.best_first, default=None)
    saved = False
    # one loader, whose worker processes serve every epoch of the run
    batches = start_loader(dataset.make_loader(data.train, trainer.sampler, cfg, data.ids["pad"], device,
                                               trainer.sampler.epochs_from(progress.epoch, progress.batch_in_epoch)))
    while progress.epoch < epoch_limit(cfg) and progress.step < progress.total_steps:
        # a signal that came during the last evaluation, or a budget spent by the epoch's last steps
        stop, out_of_time = any_rank([bool(stop_signal), budget_spent(cfg, progress.train_seconds)], world_size,
                                     device)
        if stop:
            if partial["seconds"]:  # epochs trained since the last evaluation are saved too
                ckpt.save(trainer, progress, partial, paths["last.pt"], is_main)
            log(f"stopped after epoch {progress.epoch}; {paths['last.pt']} holds it; continue with --resume auto")
            raise SystemExit(128 + stop_signal[0] if stop_signal else 1)
        if out_of_time:
            end_schedule_here(progress, log)
            ckpt.save(trainer, progress, partial, paths["last.pt"], is_main)
            saved = True
            break
        sums, interrupted = train_epoch(trainer, progress, partial, stop_signal, writer, batches)
        if interrupted:
            ckpt.save(trainer, progress, sums, paths["last.pt"], is_main)
            log(f"interrupted at step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}); "
                f"saved {paths['last.pt']}; continue with --resume auto")
            if world_size > 1:
                dist.barrier()
            raise SystemExit(128 + stop_signal[0] if stop_signal else 1)
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        if not evaluation_due(cfg, progress, sums):
            partial = sums  # the next metrics line covers this epoch too
            continue
        if cfg.max_minutes and progress.calibrated:
            last_evaluated = progress.history[-1]["step"] if progress.history else 0
            refit_schedule(trainer, progress, progress.step - last_evaluated, sums["seconds"], log)
        line = end_interval(trainer, progress, sums, log)
        partial = new_epoch_sums()
        ckpt.save(trainer, progress, partial, paths["last.pt"], is_main)
        saved = True
        if is_main:
            if best is None or ckpt.best_first(line) < ckpt.best_first(best):
                best = line
                ckpt.copy_atomic(paths["last.pt"], paths["best.pt"])
            ckpt.write_lines_atomic(progress.history, paths["metrics.jsonl"])
            for name in ("train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "tokens_per_sec", "fraction_of_peak"):
                if line.get(name) is not None:
                    writer.add_scalar(f"epoch/{name}", line[name], progress.epoch)
            writer.flush()
        if world_size > 1:
            dist.barrier()
    if not saved and resume_path != paths["last.pt"]:  # a finished run resumed into another --run_dir
        ckpt.save(trainer, progress, partial, paths["last.pt"], is_main)
    if writer:
        writer.close()
    final = paths["best.pt"] if os.path.isfile(paths["best.pt"]) else paths["last.pt"]
    chosen = "no evaluation" if best is None else ", ".join([f"step {best['step']}"] + [
        f"{name} {best[name]:.4g}" for name in ("bleu", "val_loss") if best.get(name) is not None])
    log(f"done: {os.path.abspath(final)} ({chosen})")


if __name__ == "__main__":
    main()
