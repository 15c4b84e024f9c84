"""Evaluation: when it falls due, what it measures (the validation loss, then BLEU/chrF/CER/WER on translated
validation sentences), and the metrics line each one adds to the run's history. Saving is train.py's."""
import torch
import torch.distributed as dist

import batching
import dataset
from budget import budget_spent, epoch_limit
from metrics import fraction_of_peak, score
from model import translate
from runtime import any_rank, autocast, running_loader
from step import compute_loss

AUTO_EVAL_MINUTES = 10  # --eval_every_minutes 0 without --max_minutes: every epoch, or this often within one


@torch.no_grad()
def evaluate(model, data, cfg, precision, clock):
    """The validation split's loss and scores (BLEU/chrF/CER/WER of its first n_eval_sentences translated), then
    each --eval_files set's, whole, under "<name>/" keys with the seconds it took. Returns (metrics, examples)."""
    n = min(cfg.n_eval_sentences, len(data.val))
    loss, scores, examples = evaluate_set(model, data, data.val, data.val_pairs, n, cfg, precision)
    metrics = {"val_loss": loss, **scores}
    for name, (examples_set, pairs) in data.eval_sets.items():
        started = clock()
        loss, scores, _ = evaluate_set(model, data, examples_set, pairs, len(pairs), cfg, precision)
        metrics.update({f"{name}/{key}": value for key, value in {"loss": loss, **scores}.items()})
        metrics[f"{name}/seconds"] = clock() - started
    return metrics, examples


def evaluate_set(model, data, examples, pairs, n, cfg, precision):
    """Teacher-forced loss on the TranslationDataset `examples` (of these string pairs), then scores of its
    first n sentences translated: (loss, scores, two (source, reference, translation) examples)."""
    device, dtype = precision
    model.eval()
    pad_id = data.ids["pad"]
    loader = batching.make_loader(examples, batching.make_sampler(cfg, examples.lengths(), shuffle=False), cfg,
                                  pad_id, device)
    loss_sum, n_tokens = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    with running_loader(loader) as batches:
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, dtype):
                logits = model(batch["src"], batch["tgt_in"])
            loss_sum += compute_loss(logits, batch["labels"], pad_id, cfg.label_smoothing)
            n_tokens += (batch["labels"] != pad_id).sum()
    sources = [examples.source(i) for i in range(min(n, len(examples)))]
    with autocast(device, dtype):
        outputs = translate(model, sources, data.ids["sos"], data.ids["eos"], cfg.beam, cfg.length_penalty,
                            cfg.max_len_a, cfg.max_len_b)
    hypotheses = [dataset.decode(data.tgt_tokenizer, ids, cfg.tokenizer == "word") for ids in outputs]
    references = [target for _, target in pairs[:n]]
    model.train()
    scores = score(hypotheses, references) if n else {}
    return (float(loss_sum) / max(1, int(n_tokens)), scores,
            [(pairs[i][0], references[i], hypotheses[i]) for i in range(min(2, n))])


def evaluation_interval(cfg):
    """Seconds of training between evaluations (and saves), within an epoch too: --eval_every_minutes, or auto:
    a fifth of --max_minutes (each evaluation refits its schedule), else AUTO_EVAL_MINUTES (or every epoch, if
    sooner: see evaluation_due)."""
    return 60 * (cfg.eval_every_minutes or cfg.max_minutes / 5 or AUTO_EVAL_MINUTES)


def evaluation_due(cfg, progress, sums, ending):
    """Whether to evaluate (and save) now, where train_interval stopped: at the run's end, when the interval is
    up, and under auto without --max_minutes at every epoch's end. A short epoch (a GPU's) is not evaluated on
    its own under --max_minutes, which would spend more time evaluating than training."""
    every_epoch = ending == "epoch" and not cfg.eval_every_minutes and not cfg.max_minutes
    return (ending == "evaluation" or every_epoch or progress.epoch >= epoch_limit(cfg)
            or progress.step >= progress.total_steps or budget_spent(cfg, progress.train_seconds)
            or sums.seconds >= evaluation_interval(cfg))


def end_interval(trainer, progress, sums, log, clock):
    """Combine the ranks' sums since the last evaluation, evaluate on rank 0, append the metrics line. clock: what
    train.py measures time with."""
    device = trainer.precision.device
    loss_sum, n_tokens, real_tokens = sums.loss, sums.tokens, sums.real_tokens
    if trainer.world_size > 1:
        totals = torch.tensor([loss_sum, n_tokens, real_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        loss_sum, n_tokens, real_tokens = float(totals[0]), int(totals[1]), int(totals[2])
    started = clock()
    metrics, failure = {}, None
    if trainer.rank == 0:
        try:
            metrics, examples = evaluate(trainer.translator, trainer.data, trainer.cfg, trainer.precision, clock)
        except Exception as error:  # whatever went wrong, the training since the last save is kept (run)
            failure = f"{type(error).__name__}: {error}"
        else:
            for source, reference, hypothesis in examples:
                log(f"  source:      {source}\n  reference:   {reference}\n  translation: {hypothesis}")
    if any_rank([failure is not None], trainer.world_size, device)[0]:
        raise EvaluationFailed(failure or "on rank 0")
    eval_seconds = clock() - started
    progress.elapsed_seconds += eval_seconds
    tokens_per_sec = real_tokens / max(1e-9, sums.seconds)
    epoch = progress.epoch  # epochs done, and the share of this one when it is evaluated within an epoch
    if progress.batch_in_epoch:
        epoch = round(epoch + progress.batch_in_epoch / len(trainer.sampler.batches(epoch)), 3)
    line = {"epoch": epoch, "step": progress.step, "train_loss": loss_sum / max(1, n_tokens),
            "weights": "raw" if trainer.average is None else "ema", **metrics,
            "lr": sums.lr, "tokens_per_sec": tokens_per_sec,
            "fraction_of_peak": fraction_of_peak(tokens_per_sec, trainer.flops_per_token, trainer.peak_flops),
            "epoch_seconds": sums.seconds, "eval_seconds": eval_seconds,
            "elapsed_seconds": progress.elapsed_seconds, "skipped_steps": sums.skipped}
    progress.history.append(line)
    log(f"step {progress.step:,}, epoch {epoch:g}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                                 f"{k} {v}" for k, v in line.items()
                                                                 if k not in ("epoch", "step")))
    return line


class EvaluationFailed(Exception):
    """Evaluation raised (an odd flag, a bug): run() saves the training it had reached, then stops with one line."""


