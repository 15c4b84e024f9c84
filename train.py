"""Train the English->French translator: `python train.py [--field value ...]` (fields: config.py).

Multi-GPU: `torchrun --nproc_per_node=N train.py ...`. Resume: `--resume auto`.
"""
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
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
RESUME_MAY_CHANGE = {"resume", "run_dir", "device", "num_workers", "compile", "log_every", "n_eval_sentences",
                     "beam", "length_penalty", "max_len_extra"}
MODEL_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "n_unique_layers", "share", "tie_embeddings", "dropout",
                "max_positions")


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
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def amp_dtype(cfg, device):
    """The autocast dtype, or None for full fp32."""
    mode = cfg.amp if cfg.amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit("error: --amp bf16 is not supported on this GPU; use --amp fp16")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[mode]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
                                shuffle, cfg.seed, rank, world_size, cfg.pad_multiple, cfg.bucket_pool)


def make_loader(data_set, sampler, cfg, pad_id, device):
    pack_length = cfg.pack_length if sampler.batching == "packed" else 0
    # A private generator keeps the DataLoader from drawing on the global RNG, which drives dropout:
    # otherwise a resumed run would see different dropout masks than an uninterrupted one.
    return torch.utils.data.DataLoader(data_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                       collate_fn=dataset.make_collate(pad_id, cfg.pad_multiple, None, pack_length),
                                       pin_memory=device.type == "cuda", generator=torch.Generator())


# ---------------------------------------------------------------- one step

def compute_loss(logits, labels, pad_id, label_smoothing):
    """Summed label-smoothed cross-entropy over real target tokens, in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=pad_id,
                           label_smoothing=label_smoothing, reduction="sum")


def train_step(model, batch, optimizer, scheduler, scaler, precision, cfg, pad_id, world_size=1):
    """One optimizer step. Returns (summed loss, target tokens, whether the optimizer stepped).

    The loss is divided by the target tokens of the whole global batch (all ranks), so DDP's gradient
    averaging gives exactly the gradient of one big batch. A skipped step (fp16 overflow, or a
    non-finite gradient in fp32/bf16) leaves weights and the OneCycle schedule untouched.
    """
    device, dtype = precision
    labels = batch["labels"]
    n_tokens = (labels != pad_id).sum()
    global_tokens = n_tokens.clone()
    if world_size > 1:
        dist.all_reduce(global_tokens)
    with autocast(device, dtype):
        logits = model(batch["src"], batch["tgt_in"], batch.get("src_segments"), batch.get("tgt_segments"))
    loss_sum = compute_loss(logits, labels, pad_id, cfg.label_smoothing)
    scaler.scale(loss_sum * world_size / global_tokens).backward()
    scaler.unscale_(optimizer)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skips
    else:
        stepped = bool(torch.isfinite(grad_norm))
        if stepped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stepped:
        scheduler.step()
    return loss_sum.detach(), n_tokens, stepped


def make_optimizer(cfg, model, device, total_steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    # OneCycle's three phases each need a step or more: very short runs warm up over at least 1.5 steps.
    pct_start = min(0.45, max(cfg.pct_start, 1.5 / total_steps))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, anneal_strategy="linear",
        div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor, three_phase=True)
    return optimizer, scheduler


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
                            cfg.length_penalty, cfg.max_len_extra)
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


# ---------------------------------------------------------------- checkpoints

def save_atomic(state, path):
    """Write to a temporary file, then rename: a crash at any moment leaves the previous file intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def copy_atomic(source, path):
    shutil.copyfile(source, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise SystemExit(f"error: cannot read checkpoint {path}: truncated or corrupt "
                         f"({type(error).__name__})") from None


def check_resumable(saved, cfg, path):
    current = dataclasses.asdict(cfg)
    for name, value in current.items():
        if name not in RESUME_MAY_CHANGE and saved.get(name) != value:
            raise SystemExit(f"error: {path} was trained with --{name} {saved.get(name)} but this run has --{name} "
                             f"{value}; resume with the same value (the schedule, data and model must match) "
                             "or start a new --run_dir")


def rank_states(world_size, partial_epoch):
    """Every rank's RNG states and running epoch sums: a resumed run then draws the same dropout masks
    and reports the same epoch loss as an uninterrupted one."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "partial": partial_epoch}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- the run

def main(argv=None):
    cfg = Config.from_args(argv)
    rank, world_size, device = setup_distributed(cfg)
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    precision = (device, amp_dtype(cfg, device))
    os.makedirs(cfg.run_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.run_dir, "last.pt"), os.path.join(cfg.run_dir, "best.pt")
    metrics_path = os.path.join(cfg.run_dir, "metrics.jsonl")

    resume_path = last_path if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.isfile(last_path):
        log(f"resume: no {last_path} yet, starting a new run")
        resume_path = ""
    checkpoint = None
    if resume_path:
        checkpoint = load_checkpoint(resume_path)
        check_resumable(checkpoint["config"], cfg, resume_path)
        log(f"resume: {resume_path} (epoch {checkpoint['epoch']}, batch {checkpoint['batch_in_epoch']}, "
            f"step {checkpoint['step']})")

    tokenizers = [dataset.tokenizer_from_json(text) for text in checkpoint["tokenizers"]] if checkpoint else None
    data = prepare_data(cfg, tokenizers, log) if tokenizers or is_main else None
    if world_size > 1 and not tokenizers:  # rank 0 trained the tokenizers; the others use the very same ones
        shared = [[data.src_tokenizer.to_str(), data.tgt_tokenizer.to_str()] if is_main else None]
        dist.broadcast_object_list(shared)
        if not is_main:
            data = prepare_data(cfg, [dataset.tokenizer_from_json(text) for text in shared[0]], log)
    tokenizer_json = [data.src_tokenizer.to_str(), data.tgt_tokenizer.to_str()]
    if is_main:
        for name, text in zip((f"tokenizer_{cfg.lang_src}.json", f"tokenizer_{cfg.lang_tgt}.json"), tokenizer_json):
            with open(os.path.join(cfg.run_dir, name), "w", encoding="utf-8") as file:
                file.write(text)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    total, unique = model.parameter_counts()
    log(f"model: {unique:,} unique parameters ({total:,} counting every use of shared layers and tied embeddings); "
        f"layers use blocks {model.layout}")
    train_model = model
    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    sampler = make_sampler(cfg, data.train.lengths(), rank, world_size)
    batches_per_epoch = []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)
        batches_per_epoch.append(len(sampler))
    total_steps = sum(batches_per_epoch) if not cfg.max_steps else min(cfg.max_steps, sum(batches_per_epoch))
    optimizer, scheduler = make_optimizer(cfg, model, device, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision[1] == torch.float16)
    log(f"train: {total_steps:,} steps over {cfg.epochs} epochs (~{batches_per_epoch[0]:,} batches per epoch"
        f"{' per rank' if world_size > 1 else ''}, {cfg.batching}), device {device}, "
        f"amp {precision[1] or 'off (fp32)'}, "
        f"{'world size ' + str(world_size) if world_size > 1 else 'single process'}")

    epoch, batch_in_epoch, step, history, elapsed = 0, 0, 0, [], 0.0
    partial = {"loss": 0.0, "tokens": 0, "real_tokens": 0, "seconds": 0.0, "skipped": 0}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        epoch, batch_in_epoch, step = checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]
        history, elapsed = checkpoint["history"], checkpoint["elapsed_seconds"]
        partial = checkpoint["ranks"][rank]["partial"]
        restore_rng(checkpoint["ranks"][rank])
    if is_main:  # metrics.jsonl always holds exactly the epochs this run's state has completed
        with open(metrics_path, "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in history)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(cfg.run_dir, purge_step=step if checkpoint else None)

    def state(next_epoch, next_batch, partial_epoch):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": next_epoch, "batch_in_epoch": next_batch, "step": step,
                "ranks": rank_states(world_size, partial_epoch), "config": dataclasses.asdict(cfg),
                "tokenizers": tokenizer_json, "history": history, "elapsed_seconds": elapsed}

    stop_signal = []

    def request_stop(signum, frame):
        stop_signal.append(signum)
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    pad_id = data.ids["pad"]
    best_val = min((line["val_loss"] for line in history), default=float("inf"))
    bad_steps = 0
    while epoch < cfg.epochs and step < total_steps:
        sampler.set_epoch(epoch, batch_in_epoch)
        loader = make_loader(data.train, sampler, cfg, pad_id, device)
        loss_sum = torch.tensor(partial["loss"], dtype=torch.float64, device=device)
        n_tokens = torch.tensor(partial["tokens"], device=device)
        real_tokens, skipped, seconds_before = partial["real_tokens"], partial["skipped"], partial["seconds"]
        started = time.time()
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main, dynamic_ncols=True,
                        initial=batch_in_epoch, total=batch_in_epoch + len(sampler))
        interrupted = False
        for batch in progress:
            if step >= total_steps:  # max_steps reached mid-epoch
                break
            real_tokens += int((batch["src"] != pad_id).sum() + (batch["labels"] != pad_id).sum())
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses; the scheduler moves it on afterwards
            step_loss, step_tokens, stepped = train_step(train_model, batch, optimizer, scheduler, scaler, precision,
                                                         cfg, pad_id, world_size)
            loss_sum += step_loss
            n_tokens += step_tokens
            step += 1
            batch_in_epoch += 1
            if not stepped and scaler.is_enabled():
                skipped += 1
            bad_steps = 0 if stepped or scaler.is_enabled() else bad_steps + 1
            if bad_steps >= cfg.nan_patience:
                raise SystemExit(f"error: the loss or its gradients were not finite for {bad_steps} consecutive steps "
                                 f"(last at step {step}); lower --lr (now {cfg.lr}) or check the data")
            if step % cfg.log_every == 0 and is_main:
                loss = float(step_loss) / max(1, int(step_tokens))
                rate = (real_tokens - partial["real_tokens"]) / max(1e-9, time.time() - started)
                progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/tokens_per_sec", rate, step)
            stop_now = bool(stop_signal)
            if world_size > 1:  # every rank must leave the loop at the same step
                flag = torch.tensor(float(stop_now), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag)
            if stop_now:
                interrupted = True
                break
        progress.close()
        epoch_seconds = seconds_before + time.time() - started
        elapsed += time.time() - started
        if interrupted:
            partial_epoch = {"loss": float(loss_sum), "tokens": int(n_tokens), "real_tokens": real_tokens,
                             "seconds": epoch_seconds, "skipped": skipped}
            snapshot = state(epoch, batch_in_epoch, partial_epoch)
            if is_main:
                save_atomic(snapshot, last_path)
                log(f"interrupted at step {step} (epoch {epoch + 1}, batch {batch_in_epoch}); "
                    f"saved {last_path}; continue with --resume auto")
            if world_size > 1:
                dist.barrier()
                dist.destroy_process_group()
            sys.exit(128 + stop_signal[0] if stop_signal else 1)

        if world_size > 1:
            totals = torch.tensor([float(loss_sum), float(n_tokens), float(real_tokens)], dtype=torch.float64,
                                  device=device)
            dist.all_reduce(totals)
            loss_sum, n_tokens, real_tokens = totals[0], totals[1], int(totals[2])
        started = time.time()
        metrics = {}
        if is_main:
            metrics, examples = evaluate(model, data, cfg, precision)
            for source, reference, hypothesis in examples:
                log(f"  source:      {source}\n  reference:   {reference}\n  translation: {hypothesis}")
        elapsed += time.time() - started
        line = {"epoch": epoch + 1, "step": step, "train_loss": float(loss_sum) / max(1, int(n_tokens)), **metrics,
                "lr": lr, "tokens_per_sec": real_tokens / max(1e-9, epoch_seconds),
                "epoch_seconds": epoch_seconds, "elapsed_seconds": elapsed, "skipped_steps": skipped}
        history.append(line)
        epoch, batch_in_epoch = epoch + 1, 0
        partial = {"loss": 0.0, "tokens": 0, "real_tokens": 0, "seconds": 0.0, "skipped": 0}
        snapshot = state(epoch, 0, partial)
        if is_main:
            save_atomic(snapshot, last_path)
            if line["val_loss"] < best_val:
                best_val = line["val_loss"]
                copy_atomic(last_path, best_path)
            with open(metrics_path, "a") as file:
                file.write(json.dumps(line) + "\n")
            for name in ("train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "tokens_per_sec"):
                if name in line:
                    writer.add_scalar(f"epoch/{name}", line[name], epoch)
            writer.flush()
            log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in line.items() if k != "epoch"))
        if world_size > 1:
            dist.barrier()
    if writer:
        writer.close()
    if world_size > 1:
        dist.destroy_process_group()
    log(f"done: {os.path.abspath(best_path)} (best val_loss {best_val:.4f})")


if __name__ == "__main__":
    main()
