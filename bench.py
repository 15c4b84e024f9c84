"""Side-by-side throughput: the same model on the same data under several batching/precision variants.

    python bench.py --data_files a.jsonl b.jsonl --seconds 20 [any config.py flag]

Each variant trains from the same initial weights for --seconds (after a few untimed warm-up steps),
then the trained weights are decoded greedily without and with the cache and with beam search.
Prints one JSON object on stdout; progress goes to stderr. `pad_fraction` is the padding share of the
batches a variant trained on in its time; `epoch_pad_fraction` that of a whole epoch of its batches.

Variants: fixed (random batches, every sequence padded to the longest in the data), dynamic (random
batches padded to their own longest: the reference's technique, the baseline of every ratio), bucketed
(length-bucketed batches), packed (random batches packed into rows: the default), and bucketed_amp /
packed_amp (the same under autocast: bf16 on CPU, fp16 with GradScaler on CUDA); on CUDA also
packed_bf16 and packed_amp_compile. fixed and dynamic always take --batch_size sentences, as the
reference did; the others take --max_tokens when it is set.
"""
import argparse
import copy
import dataclasses
import itertools
import json
import platform
import sys
import time

import torch

import dataset
import train
from config import Config
from model import translate
from translate import load_translator


def log(message):
    print(message, file=sys.stderr, flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_pad_fraction(sampler, pad_multiple, fixed_lengths, pack_length):
    """Padding share of a whole epoch of this sampler's batches (the timed run sees only some of them)."""
    real, padded = 0, 0
    for batch in sampler.batches():
        lengths = [sampler.lengths[i] for i in batch]
        rows, src_len, tgt_len = dataset.batch_layout(lengths, pad_multiple, fixed_lengths, pack_length)
        real += sum(s + t for s, t in lengths)
        padded += len(rows) * (src_len + tgt_len)
    return 1 - real / padded


def endless(sampler):
    """Batches epoch after epoch, for as long as the timer wants them."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from sampler


def run_variant(name, cfg, data, init_state, device, seconds, amp, batching, fixed_lengths=None, compile=False):
    """Train for `seconds` and count real and padded tokens. Returns the result dict and the trained model."""
    variant_cfg = dataclasses.replace(cfg, batching=batching, max_tokens=0 if batching == "random" else cfg.max_tokens)
    model = train.build_model(cfg, data).to(device)
    model.load_state_dict(init_state)
    step_model = torch.compile(model) if compile else model
    optimizer, scheduler = train.make_optimizer(cfg, model, device, 1_000_000)
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    pad_id = data.ids["pad"]
    sampler = train.make_sampler(variant_cfg, data.train.lengths())
    pack_length = cfg.pack_length if batching == "packed" else 0
    collate = dataset.make_collate(pad_id, cfg.pad_multiple, fixed_lengths, pack_length)
    warmup, steps, real, padded, started = 3, 0, 0, 0, None
    for indices in endless(sampler):
        batch = collate([data.train[i] for i in indices])
        if steps == warmup:
            synchronize(device)
            started = time.perf_counter()
        if started is not None:
            real += int((batch["src"] != pad_id).sum() + (batch["labels"] != pad_id).sum())
            padded += batch["src"].numel() + batch["labels"].numel()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        train.train_step(step_model, batch, optimizer, scheduler, scaler, (device, dtype), cfg, pad_id)
        steps += 1
        if started is not None and steps % 5 == 0:
            synchronize(device)
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    sampler.set_epoch(0)
    result = {"real_tokens_per_sec": real / elapsed, "pad_fraction": 1 - real / padded,
              "epoch_pad_fraction": epoch_pad_fraction(sampler, cfg.pad_multiple, fixed_lengths, pack_length),
              "steps": steps - warmup, "seconds": elapsed, "amp": amp, "compile": compile}
    log(f"{name}: {result['real_tokens_per_sec']:,.0f} real tokens/s, pad fraction {result['pad_fraction']:.3f} "
        f"(whole epoch {result['epoch_pad_fraction']:.3f})")
    return result, model


def decoding_speeds(model, sources, ids, cfg, beam):
    results = {}
    for name, options in [("greedy_no_cache", dict(use_cache=False)), ("greedy_cache", dict()),
                          (f"beam{beam}", dict(beam=beam, alpha=cfg.length_penalty))]:
        started = time.perf_counter()
        translate(model, sources, ids["sos"], ids["eos"], max_len_extra=cfg.max_len_extra, **options)
        synchronize(next(model.parameters()).device)
        results[f"{name}_sentences_per_sec"] = len(sources) / (time.perf_counter() - started)
        log(f"decoding {name}: {results[f'{name}_sentences_per_sec']:.1f} sentences/s")
    results["cache_speedup"] = results["greedy_cache_sentences_per_sec"] / results["greedy_no_cache_sentences_per_sec"]
    results["sentences"] = len(sources)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per variant")
    parser.add_argument("--decode_sentences", type=int, default=200, help="validation sentences to decode")
    parser.add_argument("--decode_beam", type=int, default=4, help="beam size for the beam-search speed")
    parser.add_argument("--decode_checkpoint", help="decode with this trained checkpoint's weights instead of the "
                                                    "briefly trained benchmark weights (whose outputs stop early)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = Config.from_args(rest, prog="bench.py")
    if not cfg.data_files:
        raise SystemExit("error: bench.py needs --data_files (local pairs; the benchmark never downloads)")
    _, _, device = train.setup_distributed(cfg)
    torch.manual_seed(cfg.seed)
    data = train.prepare_data(cfg, log=log)
    init_state = copy.deepcopy(train.build_model(cfg, data).state_dict())
    lengths = data.train.lengths()
    longest = (max(s for s, _ in lengths), max(t for _, t in lengths))
    amp = "fp16" if device.type == "cuda" else "bf16"
    variants = {"fixed": dict(amp="off", batching="random", fixed_lengths=longest),
                "dynamic": dict(amp="off", batching="random"),
                "bucketed": dict(amp="off", batching="bucketed"),
                "bucketed_amp": dict(amp=amp, batching="bucketed"),
                "packed": dict(amp="off", batching="packed"),
                "packed_amp": dict(amp=amp, batching="packed")}
    if device.type == "cuda":
        variants["packed_bf16"] = dict(amp="bf16", batching="packed")
        variants["packed_amp_compile"] = dict(amp=amp, batching="packed", compile=True)
    results, model = {}, None
    for name, options in variants.items():
        results[name], model = run_variant(name, cfg, data, init_state, device, args.seconds, **options)
    baseline = results["dynamic"]["real_tokens_per_sec"]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds_per_variant": args.seconds,
        "config": {k: getattr(cfg, k) for k in ("tokenizer", "d_model", "n_heads", "d_ff", "n_layers",
                                                "n_unique_layers", "share", "batch_size", "max_tokens",
                                                "pack_length", "pad_multiple")},
        "variants": results,
        "ratios_vs_dynamic": {name: r["real_tokens_per_sec"] / baseline for name, r in results.items()},
    }
    sources, ids = data.val.src_ids[:args.decode_sentences], data.ids
    if args.decode_checkpoint:
        model, src_tokenizer, tgt_tokenizer, _ = load_translator(args.decode_checkpoint, device)
        sources = dataset.encode(src_tokenizer, [source for source, _ in data.val_pairs[:args.decode_sentences]])
        ids = dataset.special_ids(tgt_tokenizer)
        report["decoding_checkpoint"] = args.decode_checkpoint
    report["decoding"] = decoding_speeds(model.eval(), sources, ids, cfg, args.decode_beam)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
