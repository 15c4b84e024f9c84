"""One optimizer step: the loss, forward and backward (autocast, gradient accumulation, DDP), unscaling and
clipping, the AdamW update (skipped on the device when not finite), the OneCycle bookkeeping (Schedule), and the
same step replayed as one CUDA graph (GraphedStep). Knows nothing about data files, epochs or evaluation."""
import collections
import contextlib
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from runtime import autocast

GRAPH_WARMUP_STEPS = 3  # eager steps before the training step is captured as a CUDA graph


def compute_loss(logits, labels, pad_id, label_smoothing):
    """Summed label-smoothed cross-entropy over real target tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


class Schedule:
    """Advances OneCycle once per optimizer update that really happened. On a CPU the verdict is a bool, decided
    at once. On CUDA fused AdamW skips a non-finite update on the device (told by the GradScaler under fp16, by
    found_inf otherwise); the verdict is copied to page-locked host memory without waiting and read a step or
    two later, when the GPU has long finished that step. Meanwhile the schedule assumes the update happened (it
    nearly always does) and steps back when it learns otherwise, so that no step waits for the GPU to know its
    rate."""

    def __init__(self, scheduler, frozen=False):
        self.scheduler, self.pending = scheduler, collections.deque()  # (host verdict, its copy's event, stepped)
        self.frozen = frozen  # holds the initial rate while --max_minutes measures the step time

    def record(self, stepped):
        """This step's verdict: a bool (decided now; returned in a list) or a device tensor (settled later; [])."""
        advance = not self.frozen
        if isinstance(stepped, bool):
            if stepped and advance:
                self.scheduler.step()
            return [stepped]
        verdict = torch.empty((), dtype=torch.bool, pin_memory=stepped.is_cuda)
        verdict.copy_(stepped, non_blocking=True)
        event = torch.cuda.Event() if stepped.is_cuda else None
        if event is not None:
            event.record()
        if advance:
            self.scheduler.step()
        self.pending.append((verdict, event, advance))
        return []

    def start_over(self, cfg, steps):
        """--max_minutes has timed its steps at the initial rate: OneCycle from here over `steps` steps (none: the
        timed steps were all the run may take), no longer frozen."""
        self.settle()
        if steps > 0:
            self.scheduler = make_scheduler(cfg, self.scheduler.optimizer, steps)
        self.frozen = False

    def refit(self, cfg, planned_total, total, step):
        """Stretch or shrink OneCycle to end at run step `total` instead of `planned_total`, going on from run step
        `step`: the curve keeps the step it started at, and the next step takes its rate on the new curve."""
        start = planned_total - self.scheduler.total_steps  # the run step OneCycle started at
        self.settle()
        self.scheduler = make_scheduler(cfg, self.scheduler.optimizer, total - start)
        self.scheduler.last_epoch = step - start - 1
        self.scheduler.step()

    def settle(self, keep=0):
        """Read the pending verdicts but the newest `keep` (waiting for their steps to finish), undoing the rate's
        advance for each skipped update; returns them, oldest first."""
        verdicts = []
        while len(self.pending) > keep:
            verdict, event, advanced = self.pending.popleft()
            if event is not None:
                event.synchronize()
            verdicts.append(bool(verdict))
            if advanced and not verdicts[-1]:
                self.scheduler.last_epoch -= 2  # OneCycle's step() counts one up and sets that step's rate
                self.scheduler.step()
        return verdicts


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
    verdicts = schedule.settle()  # after this step's work is queued: the last step's verdict has long landed
    lr = optimizer.param_groups[0]["lr"]
    stepped = apply_update(optimizer, scaler, finite, precision.device)
    verdicts += schedule.record(finite if stepped is None else stepped)
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens, verdicts, lr


def eager_step(trainer, group):
    """train_step on a group of host batches, as PyTorch runs it: one kernel launch per operation."""
    device = trainer.precision.device
    on_device = [{k: v.to(device, non_blocking=True) for k, v in batch.items()} for batch in group]
    return train_step(trainer.train_model, on_device, trainer.optimizer, trainer.schedule, trainer.scaler,
                      trainer.precision, trainer.cfg, trainer.data.ids["pad"], trainer.world_size)


class GraphedStep:
    """train_step replayed as one CUDA graph: a thousand kernel launches become one, so the GPU no longer waits
    for Python between kernels. The first GRAPH_WARMUP_STEPS steps run eagerly on a side stream (they create the
    optimizer's state and let cuBLAS and SDPA pick their kernels, as PyTorch's CUDA-graph notes ask), the next
    is captured on that same stream, and from then on each step copies its batch into the graph's input tensors
    and replays it, with up to two steps in flight. Batches must all have one shape (--batch_shape fixed). The
    optimizer reads its rate from a device tensor filled before each replay, so the schedule stays on the host as
    in eager steps; fused AdamW skips a non-finite update inside the graph (found_inf); every other number the
    step uses is constant over the run (runtime.graph_obstacle refuses what is not). Should the capture fail (an
    operation CUDA cannot record, on some GPU or library version), the run says so on stderr, `status` says
    why, and training goes on with eager steps."""

    def __init__(self, trainer):
        self.trainer, self.eager_steps, self.graph, self.failure = trainer, 0, None, None
        self.stream = torch.cuda.Stream(trainer.precision.device)

    @property
    def status(self):
        """"captured", "failed: <reason>", or "not yet captured" (still warming up)."""
        return "captured" if self.graph else f"failed: {self.failure}" if self.failure else "not yet captured"

    def __call__(self, group):
        trainer, (batch,) = self.trainer, group
        if self.failure:
            return eager_step(trainer, group)
        if self.eager_steps < GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            return self.on_side_stream(lambda: eager_step(trainer, group))
        if self.graph is None:
            try:
                self.on_side_stream(lambda: self.capture(batch))
            except Exception as error:  # a capture CUDA refused: nothing of it is kept
                self.failure, self.graph = " ".join(str(error).split())[:300] or type(error).__name__, None
                trainer.optimizer.zero_grad(set_to_none=True)
                tqdm.write(f"warning: capturing the training step as a CUDA graph failed ({self.failure}); "
                           "training goes on without (--cuda_graph false)", file=sys.stderr)
                return eager_step(trainer, group)
        for name, tensor in self.inputs.items():
            if tensor.shape != batch[name].shape:
                raise ValueError(f"a CUDA graph replays one batch shape: {tuple(batch[name].shape)} is not "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(batch[name], non_blocking=True)
        verdicts = trainer.schedule.settle(keep=1)  # the step before last: the GPU has long finished it
        lr = trainer.optimizer.param_groups[0]["lr"]
        self.lr.fill_(lr)
        self.graph.replay()
        verdicts += trainer.schedule.record(self.finite)
        return self.loss_sum, self.n_tokens, verdicts, lr

    def on_side_stream(self, work):
        """work() on the graph's own stream, ordered after and before everything on the current one."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            result = work()
        torch.cuda.current_stream().wait_stream(self.stream)
        return result

    def capture(self, batch):
        trainer = self.trainer
        device = trainer.precision.device
        self.inputs = {name: tensor.to(device) for name, tensor in batch.items()}
        groups = trainer.optimizer.param_groups
        rates = [group["lr"] for group in groups]
        self.lr = torch.tensor(rates[0], device=device)
        for group in groups:  # only while capturing: checkpoints keep a plain optimizer
            group["lr"], group["capturable"] = self.lr, True
        trainer.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: the loader's pinning thread may allocate meanwhile
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.loss_sum, self.n_tokens, self.finite = forward_backward(
                    trainer.train_model, [self.inputs], trainer.optimizer, trainer.scaler, trainer.precision,
                    trainer.cfg, trainer.data.ids["pad"], cache_casts=False)
                apply_update(trainer.optimizer, trainer.scaler, self.finite, device)
        finally:
            for group, rate in zip(groups, rates):
                group["lr"], group["capturable"] = rate, False
        self.graph = graph


def make_optimizer(cfg, model, device, total_steps):
    """AdamW (fused into a few kernels where PyTorch has them, CPU included) and the OneCycle schedule."""
    optimizer = torch.optim.AdamW(parameter_groups(cfg, model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cuda", "cpu"))
    return optimizer, make_scheduler(cfg, optimizer, total_steps)


def parameter_groups(cfg, model):
    """AdamW's parameter groups, in the order the optimizer numbers their parameters: one group decaying every
    parameter, or, with --decay_norms_and_biases false, the matrices and embeddings decayed and the LayerNorm
    weights and biases (every parameter of one dimension) in a group of their own without decay, as in nanoGPT."""
    parameters = list(model.parameters())
    if cfg.decay_norms_and_biases:
        return [{"params": parameters}]
    return [{"params": [p for p in parameters if p.dim() > 1]},
            {"params": [p for p in parameters if p.dim() <= 1], "weight_decay": 0.0}]


def make_scheduler(cfg, optimizer, total_steps):
    # OneCycle's phases each need a step or more: very short runs warm up over at least 1.5 steps.
    pct_start = min(0.45, max(cfg.pct_start, 1.5 / total_steps))
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy=cfg.anneal_strategy,
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, three_phase=cfg.three_phase,
        cycle_momentum=cfg.cycle_momentum)
