"""Train the English->French translator: `python train.py [--field value ...]` (fields: config.py).

Multi-GPU: `torchrun --nproc_per_node=N train.py ...`. Resume: `--resume auto`.
"""
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pickle
import random
import shutil
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dataset
from config import Config
from model import Transformer, translate

# Flags that may differ between a checkpoint and the run resuming it; any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "run_dir", "device", "amp", "num_workers", "compile", "log_every", "pad_multiple",
                     "n_eval_sentences", "beam", "length_penalty", "max_len_a", "max_len_b"}
MODEL_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "n_unique_layers", "share", "tie_embeddings", "dropout",
                "attn_dropout", "max_positions")
CHECKPOINT_KEYS = ("model", "config", "tokenizers")  # what translate.py needs; resuming needs RESUME_KEYS too
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "ranks")  # and every field of Progress
CALIBRATION_STEPS = (20, 120)  # --max_minutes times the steps between these two (the first ones run slower)
# GradScaler starts at 2**16; after this many consecutive skips it is below 2**-8, so gradients that still
# overflow do so whatever the scale: fp16 then counts skips against --nan_patience.
FP16_SCALE_HALVINGS = 24


@dataclasses.dataclass
class Data:
    src_tokenizer: object
    tgt_tokenizer: object
    ids: dict  # pad/unk/sos/eos ids, the same in both vocabularies
    train: dataset.TranslationDataset
    val: dataset.TranslationDataset
    val_pairs: list  # raw (source, reference) strings of the validation split


# ---------------------------------------------------------------- set-up

def setup_distributed(cfg):
    """(rank, world_size, device). torchrun sets WORLD_SIZE; plain `python train.py` stays single-process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")
    if world_size == 1:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    # Ranks wait in collectives while rank 0 trains tokenizers or evaluates: far longer than the 10-min default.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=6))
    return dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def cpu_has_bf16_matmul():
    """AMX or AVX512-BF16: the CPU multiplies bf16 matrices natively, so bf16 autocast is faster than fp32."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def amp_dtype(amp, device):
    """The autocast dtype for an --amp mode on this device, or None for full fp32."""
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else ("bf16" if cpu_has_bf16_matmul() else "off")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --amp bf16 is not supported on this GPU; use --amp fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def pad_multiple(cfg, device):
    """--pad_multiple 0: 8 on CUDA and for packed rows, so that batch widths take a few dozen values and
    kernels planned per shape (oneDNN's matrix products on a CPU, cuDNN's attention graphs, torch.compile)
    are planned a few dozen times, not for every other batch; 1 for unpacked batches on a CPU, whose short
    sentences rounding would pad by up to half."""
    return cfg.pad_multiple or (8 if device.type == "cuda" or cfg.batching == "packed" else 1)


def prepare_data(cfg, tokenizers=None, log=print):
    """Load, split, tokenize and filter. Pass `tokenizers` (from a checkpoint) to skip training them."""
    pairs, dropped = dataset.load_pairs(cfg)
    log(f"data: {len(pairs):,} pairs ({dropped:,} rows dropped: missing, empty or non-string side)")
    train_pairs, val_pairs = dataset.split_pairs(pairs, cfg.val_fraction, cfg.seed)
    src_tokenizer, tgt_tokenizer = tokenizers or dataset.train_tokenizers(train_pairs, cfg)
    ids = dataset.special_ids(tgt_tokenizer)

    def encode(pairs):
        return (dataset.encode(src_tokenizer, [s for s, _ in pairs]),
                dataset.encode(tgt_tokenizer, [t for _, t in pairs]))

    train_src, train_tgt = encode(train_pairs)
    keep = dataset.length_filter(train_src, train_tgt, cfg.max_src_tokens, cfg.max_len_diff)
    log(f"data: {len(keep):,} training pairs kept, {len(train_src) - len(keep):,} dropped by the length filters "
        f"(source > {cfg.max_src_tokens} tokens or target > source + {cfg.max_len_diff})")
    if not keep:
        raise SystemExit("error: the length filters left no training pairs; raise --max_src_tokens or --max_len_diff")
    val_src, val_tgt = encode(val_pairs)
    fits = [i for i, (s, t) in enumerate(zip(val_src, val_tgt)) if max(len(s), len(t)) < cfg.max_positions]
    log(f"data: {len(fits):,} validation pairs; vocabularies {src_tokenizer.get_vocab_size():,} ({cfg.lang_src}) / "
        f"{tgt_tokenizer.get_vocab_size():,} ({cfg.lang_tgt}), tokenizer={cfg.tokenizer}")

    def subset(src_ids, tgt_ids, indices):
        return dataset.TranslationDataset([src_ids[i] for i in indices], [tgt_ids[i] for i in indices], ids["sos"],
                                          ids["eos"])

    return Data(src_tokenizer, tgt_tokenizer, ids, subset(train_src, train_tgt, keep), subset(val_src, val_tgt, fits),
                [val_pairs[i] for i in fits])


def build_model(cfg, data):
    return Transformer(data.src_tokenizer.get_vocab_size(), data.tgt_tokenizer.get_vocab_size(), data.ids["pad"],
                       **{name: getattr(cfg, name) for name in MODEL_FIELDS})


def make_sampler(cfg, lengths, rank=0, world_size=1, shuffle=True):
    """Training batches as cfg.batching says; evaluation (shuffle=False) always uses plain length-sorted batches."""
    return dataset.BatchSampler(lengths, cfg.batch_size, cfg.max_tokens, cfg.batching if shuffle else "bucketed",
                                shuffle, cfg.seed, rank, world_size, cfg.bucket_pool)


def make_loader(data_set, sampler, cfg, pad_id, device):
    pack_length = cfg.pack_length if sampler.batching == "packed" else 0
    collate = dataset.make_collate(pad_id, pad_multiple(cfg, device), None, pack_length)
    # A private generator keeps the DataLoader from drawing on the global RNG, which drives dropout:
    # otherwise a resumed run would see different dropout masks than an uninterrupted one.
    return torch.utils.data.DataLoader(data_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                       collate_fn=collate, pin_memory=device.type == "cuda",
                                       generator=torch.Generator())


def training_flops_per_token(cfg, data):
    """Analytic matmul FLOPs of one training step per real (source + target) token over the training data:
    forward and backward (2 + 4 FLOPs per multiply-add) through every layer use, the output projection, and
    attention scores within each sentence (causal self-attention counted half). Embedding lookups and the
    optimizer are left out, as in the usual model-FLOPs-utilisation count."""
    d, n, vocab = cfg.d_model, cfg.n_layers, data.tgt_tokenizer.get_vocab_size()
    multiply_adds, tokens = 0, 0
    for s, t in data.train.lengths():
        encoder = n * (s * (4 * d * d + 2 * d * cfg.d_ff) + 2 * s * s * d)
        decoder = n * (t * (6 * d * d + 2 * d * cfg.d_ff) + s * 2 * d * d + t * t * d + 2 * t * s * d)
        multiply_adds += encoder + decoder + t * d * vocab
        tokens += s + t
    return 6 * multiply_adds / tokens


def peak_flops(device, dtype, size=None):
    """Measured FLOP/s of large matrix products in this dtype: the ceiling that fraction_of_peak divides by.
    None for fp16 on a CPU, which has no fp16 matrix units worth measuring (and takes minutes to try)."""
    if device.type == "cpu" and dtype == torch.float16:
        return None
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device).manual_seed(0)  # the global RNG drives dropout: leave it alone
    a, b = (torch.rand(size, size, device=device, generator=generator).to(dtype or torch.float32) for _ in range(2))
    best = float("inf")
    for _ in range(10):  # the fastest of several: a busy machine only ever slows a product down
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one step

def compute_loss(logits, labels, pad_id, label_smoothing):
    """Summed label-smoothed cross-entropy over real target tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


class Schedule:
    """Advances OneCycle once per optimizer update that really happened.

    fp32/bf16 must know at once whether the gradients are finite, to skip the update (one host sync per
    step). Under fp16 the GradScaler and fused AdamW skip on the device; their verdict is copied to the
    host without waiting and read at the next step, after that step's forward and backward are queued,
    when the GPU has long finished it. Every update still uses exactly the rate it would get with an
    immediate check, and no fp16 step waits for the GPU."""

    def __init__(self, scheduler, frozen=False):
        self.scheduler, self.pending, self.event = scheduler, None, None
        self.frozen = frozen  # holds the initial rate while --max_minutes measures the step time

    def record(self, stepped):
        """This step's verdict: a bool (decided now) or a device tensor (read at the next settle)."""
        if isinstance(stepped, bool):
            if stepped and not self.frozen:
                self.scheduler.step()
            return stepped
        self.pending = stepped.to("cpu", non_blocking=True)  # lands in pinned memory
        if stepped.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        return None

    def settle(self):
        """Apply the pending verdict, if any; returns it (None when nothing was pending)."""
        if self.pending is None:
            return None
        if self.event is not None:
            self.event.synchronize()
        stepped, self.pending, self.event = bool(self.pending), None, None
        if stepped and not self.frozen:
            self.scheduler.step()
        return stepped


def train_step(model, batches, optimizer, schedule, scaler, precision, cfg, pad_id, world_size=1):
    """One optimizer step over one or more batches (gradient accumulation). Returns (summed loss, target
    tokens, verdicts, lr): verdicts lists whether the updates settled by this call happened (under fp16,
    the previous step's; see Schedule), lr the rate this update used.

    Every batch's loss is divided by the target tokens of all the step's batches on all ranks, so
    accumulation and DDP's gradient averaging give exactly the gradient of one big batch. A skipped update
    (non-finite gradients: fp16 overflow, or a NaN in any precision) leaves weights and schedule untouched.
    """
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
            with autocast(device, dtype):
                logits = model(batch["src"], batch["tgt_in"], batch.get("src_segments"), batch.get("tgt_segments"))
            batch_loss = compute_loss(logits, batch["labels"], pad_id, cfg.label_smoothing)
            scaler.scale(batch_loss * world_size / global_tokens).backward()
        loss_sum += batch_loss.detach()
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    verdicts = [schedule.settle()]
    lr = optimizer.param_groups[0]["lr"]
    if scaler.is_enabled():
        scaler.step(optimizer)  # fused AdamW skips a non-finite step on the device, without a host sync
        scaler.update()
        verdicts.append(schedule.record(torch.isfinite(grad_norm)))
    else:
        stepped = bool(torch.isfinite(grad_norm))
        if stepped:
            optimizer.step()
        verdicts.append(schedule.record(stepped))
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, n_tokens, [v for v in verdicts if v is not None], lr


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
    import sacrebleu
    from torchmetrics.functional.text import char_error_rate, word_error_rate
    device, dtype = precision
    model.eval()
    pad_id = data.ids["pad"]
    loader = make_loader(data.val, make_sampler(cfg, data.val.lengths(), shuffle=False), cfg, pad_id, device)
    loss_sum, n_tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for batch in loader:
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
        metrics.update(bleu=sacrebleu.corpus_bleu(hypotheses, [references]).score,
                       chrf=sacrebleu.corpus_chrf(hypotheses, [references]).score,
                       cer=float(char_error_rate(hypotheses, references)),
                       wer=float(word_error_rate(hypotheses, references)))
    examples = [(data.val_pairs[i][0], references[i], hypotheses[i]) for i in range(min(2, n))]
    return metrics, examples


# ---------------------------------------------------------------- run directory and checkpoints

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


def _write_or_explain(write, path):
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
    _write_or_explain(lambda temporary: torch.save(state, temporary), path)


def copy_atomic(source, path):
    _write_or_explain(lambda temporary: shutil.copyfile(source, temporary), path)


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


# ---------------------------------------------------------------- the run

@dataclasses.dataclass
class Trainer:
    """What one training run works with, so the epoch loop takes one argument instead of a dozen."""
    cfg: Config
    model: torch.nn.Module  # the plain module: evaluated and saved
    train_model: torch.nn.Module  # the same, wrapped in DDP and/or compiled: trained
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    precision: tuple  # (device, autocast dtype or None)
    sampler: dataset.BatchSampler
    data: Data
    rank: int
    world_size: int
    flops_per_token: float
    peak_flops: float  # None where not measured (other ranks, fp16 on a CPU)
    session_steps: int = 0  # steps taken by this process (a resumed run starts again at 0)
    bad_steps: int = 0  # consecutive skipped updates, across epochs
    calibration_start: float = None  # when --max_minutes started timing steps


@dataclasses.dataclass
class Progress:
    """Where the run stands: saved in every checkpoint, restored on resume."""
    total_steps: int
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)  # one metrics line per completed epoch
    elapsed_seconds: float = 0.0  # training and evaluation, all sessions
    train_seconds: float = 0.0  # training steps only, all sessions: what --max_minutes budgets
    calibrated: bool = False  # --max_minutes has sized the schedule


def new_epoch_sums():
    return {"loss": 0.0, "tokens": 0, "real_tokens": 0, "seconds": 0.0, "skipped": 0}


def main(argv=None):
    cfg = Config.from_args(argv)
    rank, world_size, device = setup_distributed(cfg)
    try:
        with locked_run_dir(cfg.run_dir, rank == 0):
            run(cfg, rank, world_size, device)
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, rank, world_size, device):
    """The outline of a run: set-up, resume, epochs (train, evaluate, save)."""
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    precision = (device, amp_dtype(cfg.amp, device))
    paths = {name: os.path.join(cfg.run_dir, name) for name in ("last.pt", "best.pt", "metrics.jsonl")}
    checkpoint = load_resume_checkpoint(cfg, paths["last.pt"], world_size, log)
    data = share_data(cfg, checkpoint, is_main, world_size, log)
    if is_main:
        for language, tokenizer in ((cfg.lang_src, data.src_tokenizer), (cfg.lang_tgt, data.tgt_tokenizer)):
            _write_or_explain(lambda temporary: tokenizer.save(temporary), os.path.join(cfg.run_dir,
                                                                                       f"tokenizer_{language}.json"))
    trainer, progress = build_trainer(cfg, data, checkpoint, rank, world_size, precision, log)
    if is_main:  # metrics.jsonl always holds exactly the epochs this run's state has completed
        _write_or_explain(lambda temporary: write_lines(temporary, progress.history), paths["metrics.jsonl"])
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.run_dir, purge_step=progress.step if checkpoint else None)
    partial = checkpoint["ranks"][rank]["partial"] if checkpoint else new_epoch_sums()
    stop_signal = catch_stop_signals()
    best_val = min((line["val_loss"] for line in progress.history), default=float("inf"))
    while progress.epoch < cfg.epochs and progress.step < progress.total_steps:
        # a signal that came during the last evaluation, or a budget spent by the epoch's last steps
        stop, out_of_time = any_rank([bool(stop_signal), budget_spent(cfg, progress.train_seconds)], world_size,
                                     device)
        if stop:
            log(f"stopped after epoch {progress.epoch}; {paths['last.pt']} holds it; continue with --resume auto")
            raise SystemExit(128 + stop_signal[0] if stop_signal else 1)
        if out_of_time:
            end_schedule_here(progress, log)
            save_checkpoint(trainer, progress, partial, paths["last.pt"], is_main)
            break
        sums, interrupted = train_epoch(trainer, progress, partial, stop_signal, writer)
        if interrupted:
            save_checkpoint(trainer, progress, sums, paths["last.pt"], is_main)
            log(f"interrupted at step {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch_in_epoch}); "
                f"saved {paths['last.pt']}; continue with --resume auto")
            if world_size > 1:
                dist.barrier()
            raise SystemExit(128 + stop_signal[0] if stop_signal else 1)
        line = end_epoch(trainer, progress, sums, log)
        partial = new_epoch_sums()
        save_checkpoint(trainer, progress, partial, paths["last.pt"], is_main)
        if is_main:
            if line["val_loss"] < best_val:
                best_val = line["val_loss"]
                copy_atomic(paths["last.pt"], paths["best.pt"])
            _write_or_explain(lambda temporary: write_lines(temporary, progress.history), paths["metrics.jsonl"])
            for name in ("train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "tokens_per_sec", "fraction_of_peak"):
                if line.get(name) is not None:
                    writer.add_scalar(f"epoch/{name}", line[name], progress.epoch)
            writer.flush()
        if world_size > 1:
            dist.barrier()
    if writer:
        writer.close()
    log(f"done: {os.path.abspath(paths['best.pt'])} (best val_loss {best_val:.4f})")


def write_lines(path, lines):
    with open(path, "w") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)


def load_resume_checkpoint(cfg, last_path, world_size, log):
    resume_path = last_path if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.isfile(last_path):
        log(f"resume: no {last_path} yet, starting a new run")
        return None
    if not resume_path:
        return None
    progress_keys = tuple(field.name for field in dataclasses.fields(Progress))
    checkpoint = load_checkpoint(resume_path, required=CHECKPOINT_KEYS + RESUME_KEYS + progress_keys)
    check_resumable(checkpoint, cfg, resume_path, world_size)
    log(f"resume: {resume_path} (epoch {checkpoint['epoch']}, batch {checkpoint['batch_in_epoch']}, "
        f"step {checkpoint['step']})")
    return checkpoint


def share_data(cfg, checkpoint, is_main, world_size, log):
    """Rank 0 trains the tokenizers (or takes the checkpoint's); every rank then encodes with the very same."""
    tokenizers = [dataset.tokenizer_from_json(text) for text in checkpoint["tokenizers"]] if checkpoint else None
    if tokenizers or is_main:
        data = prepare_data(cfg, tokenizers, log)
    if world_size > 1 and not tokenizers:
        shared = [[data.src_tokenizer.to_str(), data.tgt_tokenizer.to_str()] if is_main else None]
        dist.broadcast_object_list(shared)
        if not is_main:
            data = prepare_data(cfg, [dataset.tokenizer_from_json(text) for text in shared[0]], log)
    return data


def build_trainer(cfg, data, checkpoint, rank, world_size, precision, log):
    device = precision[0]
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    total, unique = model.parameter_counts()
    log(f"model: {unique:,} unique parameters ({total:,} counting every use of shared layers and tied embeddings); "
        f"layers use blocks {model.layout}")
    train_model = model
    if world_size > 1:  # the positions table never changes: no need to broadcast it before every forward
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    if cfg.compile:
        train_model = torch.compile(train_model)
    sampler = make_sampler(cfg, data.train.lengths(), rank, world_size)
    steps_per_epoch = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        steps_per_epoch.append(-(-len(sampler) // cfg.accum_steps))
    total_steps = sum(steps_per_epoch) if not cfg.max_steps else min(cfg.max_steps, sum(steps_per_epoch))
    progress = (Progress(**{field.name: checkpoint[field.name] for field in dataclasses.fields(Progress)})
                if checkpoint else Progress(total_steps))
    optimizer, scheduler = make_optimizer(cfg, model, device, progress.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision[1] == torch.float16)
    if checkpoint:
        restore(checkpoint, rank, model, optimizer, scheduler, scaler)
    flops = training_flops_per_token(cfg, data)
    log(f"train: {progress.total_steps:,} steps{' (to be sized by --max_minutes)' if cfg.max_minutes else ''} over "
        f"{cfg.epochs} epochs (~{steps_per_epoch[0]:,} optimizer steps of {cfg.accum_steps} batch(es) per epoch"
        f"{' per rank' if world_size > 1 else ''}, {cfg.batching}), device {device}, "
        f"amp {precision[1] or 'off (fp32)'}, {'world size ' + str(world_size) if world_size > 1 else 'single process'}"
        f", {flops / 1e6:.0f} MFLOP per token")
    # a smaller product than bench.py's: this one is start-up time of every run
    peak = peak_flops(*precision, size=1024 if device.type == "cpu" else 4096) if rank == 0 else None
    schedule = Schedule(scheduler, frozen=cfg.max_minutes > 0 and not progress.calibrated)
    trainer = Trainer(cfg, model, train_model, optimizer, schedule, scaler, precision, sampler, data, rank,
                      world_size, flops, peak)
    return trainer, progress


def catch_stop_signals():
    """Ctrl-C / SIGTERM finish the current step, save and exit; a second signal ends the process at once."""
    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop_signal


def size_schedule_to_budget(trainer, progress, seconds_per_step, seconds_spent):
    """--max_minutes: the steps so far ran at the initial rate while their time was measured; fit the
    OneCycle schedule into the time that is left at that rate (rank 0 decides, so every rank runs the
    same number of steps)."""
    remaining = trainer.cfg.max_minutes * 60 - seconds_spent
    total = torch.tensor(min(progress.total_steps, progress.step + max(2, int(remaining / seconds_per_step))))
    if trainer.world_size > 1:
        total = total.to(trainer.precision[0])
        dist.broadcast(total, 0)
    trainer.schedule.settle()
    progress.total_steps, progress.calibrated = int(total), True
    trainer.schedule.scheduler = make_scheduler(trainer.cfg, trainer.optimizer, progress.total_steps - progress.step)
    trainer.schedule.frozen = False


def train_epoch(trainer, progress, sums, stop_signal, writer):
    """Train from progress.batch_in_epoch to the end of the epoch (or of the schedule, or a stop signal).
    Returns the epoch's running sums and whether a signal interrupted it."""
    cfg, (device, _), is_main = trainer.cfg, trainer.precision, trainer.rank == 0
    pad_id = trainer.data.ids["pad"]
    trainer.sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
    loader = make_loader(trainer.data.train, trainer.sampler, cfg, pad_id, device)
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=device)
    n_tokens = torch.tensor(sums["tokens"], device=device)
    real_tokens, skipped, seconds_before = sums["real_tokens"], sums["skipped"], sums["seconds"]
    started = time.time()
    progress_bar = tqdm(total=progress.batch_in_epoch + len(trainer.sampler), initial=progress.batch_in_epoch,
                        desc=f"epoch {progress.epoch + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True)
    batches, interrupted, lr = iter(loader), False, 0.0
    patience = cfg.nan_patience + (FP16_SCALE_HALVINGS if trainer.scaler.is_enabled() else 0)
    while progress.step < progress.total_steps:
        group = [batch for _, batch in zip(range(cfg.accum_steps), batches)]
        if not group:
            break
        real_tokens += sum(int((b["src"] != pad_id).sum() + (b["labels"] != pad_id).sum()) for b in group)
        group = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in group]
        step_loss, step_tokens, verdicts, lr = train_step(trainer.train_model, group, trainer.optimizer,
                                                          trainer.schedule, trainer.scaler, trainer.precision, cfg,
                                                          pad_id, trainer.world_size)
        loss_sum += step_loss
        n_tokens += step_tokens
        progress.step += 1
        trainer.session_steps += 1
        progress.batch_in_epoch += len(group)
        progress_bar.update(len(group))
        skipped += count_skips(trainer, verdicts, patience, progress.step)
        if cfg.max_minutes and not progress.calibrated and trainer.session_steps in CALIBRATION_STEPS:
            synchronize(device)
            if trainer.session_steps == CALIBRATION_STEPS[0]:
                trainer.calibration_start = time.time()
            else:
                seconds_per_step = (time.time() - trainer.calibration_start) / (CALIBRATION_STEPS[1] -
                                                                               CALIBRATION_STEPS[0])
                size_schedule_to_budget(trainer, progress, seconds_per_step,
                                        progress.train_seconds + time.time() - started)
        if progress.step % cfg.log_every == 0 and is_main:  # reading the loss is a host sync: not every step
            loss = float(step_loss) / max(1, int(step_tokens))
            rate = (real_tokens - sums["real_tokens"]) / max(1e-9, time.time() - started)
            progress_bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}",
                                     peak=f"{fraction_of_peak(trainer, rate) or 0:.0%}")
            writer.add_scalar("train/loss", loss, progress.step)
            writer.add_scalar("train/lr", lr, progress.step)
            writer.add_scalar("train/tokens_per_sec", rate, progress.step)
        # one process checks every step for free; ranks agree by an all-reduce, so only now and then
        if trainer.world_size == 1 or progress.step % cfg.log_every == 0:
            out_of_time = budget_spent(cfg, progress.train_seconds + time.time() - started)
            interrupted, out_of_time = any_rank([bool(stop_signal), out_of_time], trainer.world_size, device)
            if out_of_time:
                end_schedule_here(progress, progress_bar.write if is_main else lambda message: None)
            if interrupted:
                break
    skipped += count_skips(trainer, [trainer.schedule.settle()], patience, progress.step)
    progress_bar.close()
    seconds = time.time() - started
    progress.elapsed_seconds += seconds
    progress.train_seconds += seconds
    sums = {"loss": float(loss_sum), "tokens": int(n_tokens), "real_tokens": real_tokens,
            "seconds": seconds_before + seconds, "skipped": skipped, "lr": lr}
    return sums, interrupted


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


def any_rank(flags, world_size, device):
    """Each flag, true if it is true on any rank: every rank must leave the loop at the same step."""
    if world_size == 1:
        return [bool(flag) for flag in flags]
    tensor = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.bool().tolist()


def end_epoch(trainer, progress, sums, log):
    """Combine the ranks' sums, evaluate on rank 0 and append the epoch's metrics line to the history."""
    device = trainer.precision[0]
    loss_sum, n_tokens, real_tokens = sums["loss"], sums["tokens"], sums["real_tokens"]
    if trainer.world_size > 1:
        totals = torch.tensor([loss_sum, n_tokens, real_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, n_tokens, real_tokens = float(totals[0]), int(totals[1]), int(totals[2])
    started = time.time()
    metrics = {}
    if trainer.rank == 0:
        metrics, examples = evaluate(trainer.model, trainer.data, trainer.cfg, trainer.precision)
        for source, reference, hypothesis in examples:
            log(f"  source:      {source}\n  reference:   {reference}\n  translation: {hypothesis}")
    eval_seconds = time.time() - started
    progress.elapsed_seconds += eval_seconds
    tokens_per_sec = real_tokens / max(1e-9, sums["seconds"])
    line = {"epoch": progress.epoch + 1, "step": progress.step, "train_loss": loss_sum / max(1, n_tokens), **metrics,
            "lr": sums["lr"], "tokens_per_sec": tokens_per_sec,
            "fraction_of_peak": fraction_of_peak(trainer, tokens_per_sec),
            "epoch_seconds": sums["seconds"], "eval_seconds": eval_seconds,
            "elapsed_seconds": progress.elapsed_seconds, "skipped_steps": sums["skipped"]}
    progress.history.append(line)
    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
    log(f"epoch {progress.epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in line.items() if k != "epoch"))
    return line


def save_checkpoint(trainer, progress, sums, path, is_main):
    """Gather every rank's RNG state and sums (a collective), then rank 0 writes the checkpoint."""
    state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "scheduler": trainer.schedule.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
             **dataclasses.asdict(progress),
             "ranks": rank_states(trainer.world_size, trainer.precision[0], sums),
             "config": dataclasses.asdict(trainer.cfg),
             "tokenizers": [trainer.data.src_tokenizer.to_str(), trainer.data.tgt_tokenizer.to_str()]}
    if is_main:
        save_atomic(state, path)


if __name__ == "__main__":
    main()
