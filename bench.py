"""Side-by-side throughput: the same model on the same data under several batching/precision variants.

    python bench.py --data_files a.jsonl b.jsonl --seconds 20 [--variants default,dynamic,...] [config.py flags]

Each variant trains from the same initial weights for --seconds (after a few untimed warm-up steps), then the
trained weights are decoded greedily without and with the cache and with beam search. stdout holds JSON lines
only, each printed as soon as it is measured: a header (device, config, what --amp auto chose), one line per
variant (the profile of the default step first, when asked for), the ratios against `dynamic`, the decoding
speeds. Progress and warnings go to stderr.
`pad_fraction` is the padding share of the batches a variant trained on in its time; `epoch_pad_fraction`
that of a whole epoch of its batches; `cuda_graph` is "captured", "failed: <reason>" or "off: <why>".

Variants, the default first: default (exactly the config's batching, precision and optimizer, flags included),
fixed (random batches, every sequence padded to the longest in the data), dynamic (random batches padded to
their own longest, fp32, the reference recipe's dropout 0.1 everywhere and no weight averaging: the
reference's technique and the baseline of every ratio, pinned so that it does not move when the defaults do),
bucketed (length-bucketed batches), packed (random batches packed into rows), bucketed_amp / packed_amp (the
same under autocast: fp16 with GradScaler on CUDA; bf16 on a CPU where it measured faster than fp32, else
fp32), on CUDA packed_bf16_eager (the default's step without its CUDA graph) and packed_amp_compile, and
loader / loader_64k (the input pipeline alone, at the CUDA default's 16,384-token fixed shape and at 65,536:
real tokens per second, nothing trained). fixed and dynamic always take --batch_size sentences, as the
reference did; the others take --max_tokens when it is set. Every trained variant reports fraction_of_peak:
analytic training FLOPs per real token x real tokens/s / the peak matmul FLOP/s this script measures in that
precision, and the attention kernels SDPA chose. Decoding runs under the config's --amp (auto: see
runtime.amp_dtype).
"""
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

import batching
import dataset
import export
import runtime
import step
import train
from config import FIELD_BOUNDS, Config, OneLineParser
from errors import RunError, one_line_errors
from metrics import score
from model import int8_linear_layers, translate
from checkpoint import load_checkpoint, load_translator
from translate import translate_texts

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOADER_TOKENS = {"loader": runtime.GPU_MAX_TOKENS, "loader_64k": 65536}  # the input pipeline alone, at these budgets


def log(message):
    print(message, file=sys.stderr, flush=True)


def emit(record):
    """One JSON object on one line of stdout, as soon as it is measured: stdout holds nothing else."""
    print(json.dumps(record), flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def epoch_pad_fraction(sampler, pad_multiple, fixed_lengths, pack_length):
    """Padding share of a whole epoch of this sampler's batches (the timed run sees only some of them)."""
    real, padded = 0, 0
    for batch in sampler.batches():
        lengths = list(zip(sampler.src_lengths[batch].tolist(), sampler.tgt_lengths[batch].tolist()))
        rows, src_len, tgt_len = batching.batch_layout(lengths, pad_multiple, fixed_lengths, pack_length,
                                                      sampler.shape)
        real += sum(s + t for s, t in lengths)
        padded += len(rows) * (src_len + tgt_len)
    return 1 - real / padded


@contextlib.contextmanager
def endless(trainer, device, fixed_lengths=None):
    """Batches epoch after epoch, for as long as the timer wants them: through train.py's own loader (worker
    processes, pinned memory; shut down when the variant ends, by an error too), or collated here to
    fixed_lengths (the `fixed` variant)."""
    cfg, data, sampler = trainer.cfg, trainer.data, trainer.sampler
    if fixed_lengths is None:
        with runtime.running_loader(batching.make_loader(data.train, sampler, cfg, data.ids["pad"], device,
                                                         sampler.epochs_from(0))) as batches:
            yield batches
        return
    collate = batching.make_collate(data.ids["pad"], runtime.pad_multiple(cfg, device), fixed_lengths)
    yield (collate([data.train[i] for i in indices]) for indices in sampler.epochs_from(0))


def measure_loader(cfg, data, seconds):
    """Real (non-pad) source + target tokens per second that the input pipeline alone delivers: the CUDA
    default's loader (fixed-shape packed batches of cfg.max_tokens, its worker processes, pinned memory where
    there is a GPU), planning and collating included, nothing trained."""
    cuda = torch.device("cuda")
    cfg = runtime.resolve_autos(dataclasses.replace(cfg, batching="packed", batch_shape="fixed"), cuda,
                                data.n_train_pairs)
    shape = batching.fixed_shape(data.train.lengths(), cfg.max_tokens, cfg.pack_length, runtime.pad_multiple(cfg, cuda))
    sampler = batching.make_sampler(cfg, data.train.lengths(), shape=shape)
    loader = batching.make_loader(data.train, sampler, cfg, data.ids["pad"], cuda, sampler.epochs_from(0))
    loader.pin_memory = torch.cuda.is_available()
    pad_id, real, batches_read, started = data.ids["pad"], 0, 0, None
    with runtime.running_loader(loader) as batches:
        for batch in batches:
            if started is None:  # the first batch waits for the workers to start
                started = time.perf_counter()
                continue
            real += int((batch["src"] != pad_id).sum() + (batch["labels"] != pad_id).sum())
            batches_read += 1
            if time.perf_counter() - started >= seconds:
                break
    elapsed = time.perf_counter() - started
    return {"real_tokens_per_sec": real / elapsed, "batches_per_sec": batches_read / elapsed, "seconds": elapsed,
            "max_tokens": cfg.max_tokens, "batch_shape": list(shape), "num_workers": runtime.loader_workers(cfg, cuda),
            "pinned": loader.pin_memory, "epoch_batches": len(sampler)}


def attention_kernels(model, batch, precision, cfg, pad_id):
    """Names of the attention kernels SDPA picks for this batch (flash, memory-efficient, cuDNN or math)."""
    from torch.profiler import profile
    batch = {k: v.to(precision.device) for k, v in batch.items()}
    with profile() as profiler, runtime.autocast(*precision):
        logits = model(batch["src"], batch["tgt_in"], batch.get("src_segments"), batch.get("tgt_segments"))
        step.compute_loss(logits, batch["labels"], pad_id, cfg.label_smoothing).backward()
    model.zero_grad(set_to_none=True)
    return sorted({event.key.removeprefix("aten::") for event in profiler.key_averages()
                   if event.key.startswith("aten::_") and ("attention" in event.key or "flash" in event.key)})


def bench_trainer(cfg, data, device):
    """train.py's own trainer for this config, every variant from the same weights (seeded by --seed), with a
    schedule long enough for any benchmark (the run's own would end after --epochs)."""
    precision = runtime.Precision(device, runtime.amp_dtype(cfg.amp, device))
    trainer, _ = train.build_trainer(cfg, data, None, 0, 1, precision, log=lambda message: None)
    trainer.schedule = step.Schedule(step.make_scheduler(cfg, trainer.optimizer, 1_000_000))
    return trainer


def run_variant(name, cfg, data, device, seconds, peaks, fixed_lengths=None):
    """Train for `seconds` through train.py's own loop and count real and padded tokens. Returns the result dict
    and the trained model."""
    trainer = bench_trainer(cfg, data, device)
    precision = trainer.precision
    pad_id, pad_multiple = data.ids["pad"], runtime.pad_multiple(cfg, device)
    sampler = trainer.sampler
    pack_length = cfg.pack_length if cfg.batching == "packed" else 0
    # torch.compile compiles again for the second shape it sees (then marks sizes dynamic), a CUDA graph is
    # captured after its eager warm-up: the timing starts after that
    warmup = 30 if cfg.compile else step.GRAPH_WARMUP_STEPS + 3
    steps, real, padded, started, kernels = 0, 0, 0, None, []
    with endless(trainer, device, fixed_lengths) as batches:
        for group, *_ in train.training_steps(trainer, batches):
            batch = group[0]
            if steps == 0:
                kernels = attention_kernels(trainer.model, batch, precision, cfg, pad_id)
            steps += 1
            if steps == warmup:
                runtime.synchronize(device)
                started = time.perf_counter()
            elif started is not None:
                real += int((batch["src"] != pad_id).sum() + (batch["labels"] != pad_id).sum())
                padded += batch["src"].numel() + batch["labels"].numel()
                if steps % 5 == 0:
                    runtime.synchronize(device)
                    if time.perf_counter() - started >= seconds:
                        break
    elapsed = time.perf_counter() - started
    sampler.set_epoch(0)
    precision_name = PRECISION_NAMES[precision.dtype]
    if precision_name not in peaks:
        peaks[precision_name] = runtime.peak_flops(*precision)
        log(f"peak matmul throughput, {precision_name}: {peaks[precision_name] / 1e9:,.0f} GFLOP/s")
    result = {"real_tokens_per_sec": real / elapsed, "pad_fraction": 1 - real / padded,
              "epoch_pad_fraction": epoch_pad_fraction(sampler, pad_multiple, fixed_lengths, pack_length),
              "fraction_of_peak": real / elapsed * trainer.flops_per_token / peaks[precision_name],
              "steps": steps - warmup, "seconds": elapsed, "precision": precision_name, "batching": cfg.batching,
              "dropout": cfg.dropout, "attn_dropout": cfg.attn_dropout, "compile": cfg.compile,
              "max_tokens": cfg.max_tokens, "lr": cfg.lr, "batch_shape": list(sampler.shape or ()) or "varied",
              "cuda_graph": train.cuda_graph_status(trainer), "attention_kernels": kernels,
              "flops_per_token": trainer.flops_per_token}
    log(f"{name}: {result['real_tokens_per_sec']:,.0f} real tokens/s, {result['fraction_of_peak']:.1%} of the "
        f"{precision_name} peak, CUDA graph {result['cuda_graph']}, pad fraction {result['pad_fraction']:.3f} "
        f"(whole epoch {result['epoch_pad_fraction']:.3f}), attention {', '.join(kernels)}")
    return result, trainer.model


def profile_steps(cfg, data, device, steps):
    """torch.profiler over `steps` default training steps (after the untimed warm-up, CUDA-graph capture included):
    wall ms per step, and on CUDA the GPU-kernel ms per step, the share of the wall time the GPU is busy, the
    kernels run and the launches the host made (a graph replay is one launch of many kernels) per step."""
    from torch.profiler import ProfilerActivity, profile
    trainer = bench_trainer(cfg, data, device)
    warmup = step.GRAPH_WARMUP_STEPS + 3
    with endless(trainer, device) as batches:
        loop = train.training_steps(trainer, itertools.islice(batches, warmup + steps))
        for _ in itertools.islice(loop, warmup):
            pass
        runtime.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            started = time.perf_counter()
            for _ in loop:
                pass
            runtime.synchronize(device)
            wall = time.perf_counter() - started
    result = {"steps": steps, "wall_ms_per_step": 1000 * wall / steps, "cuda_graph": train.cuda_graph_status(trainer)}
    if device.type == "cuda":
        kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(event.time_range.elapsed_us() for event in kernels) / 1000 / steps
        launches = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CPU
                    and event.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch"))]
        result.update(kernel_ms_per_step=busy, gpu_busy_fraction=busy / result["wall_ms_per_step"],
                      kernels_per_step=len(kernels) / steps, launches_per_step=len(launches) / steps)
    log(f"profile of the default step: {result}")
    return result


def decoding_speeds(model, sources, ids, cfg, beam, precision, uncached=True):
    """Sentences and output tokens per second: greedy without (unless not `uncached`) and with the cache, and
    beam search."""
    results = {}
    modes = [("greedy_cache", dict()), (f"beam{beam}", dict(beam=beam, alpha=cfg.length_penalty))]
    for name, options in [("greedy_no_cache", dict(use_cache=False))] * uncached + modes:
        started = time.perf_counter()
        with runtime.autocast(*precision):
            outputs = translate(model, sources, ids["sos"], ids["eos"], max_len_a=cfg.max_len_a,
                                max_len_b=cfg.max_len_b, **options)
        runtime.synchronize(precision.device)
        seconds = time.perf_counter() - started
        results[f"{name}_sentences_per_sec"] = len(sources) / seconds
        results[f"{name}_tokens_per_sec"] = sum(len(output) + 1 for output in outputs) / seconds
        log(f"decoding {name}: {results[f'{name}_sentences_per_sec']:.1f} sentences/s")
    if uncached:
        results["cache_speedup"] = (results["greedy_cache_sentences_per_sec"] /
                                    results["greedy_no_cache_sentences_per_sec"])
    results["sentences"] = len(sources)
    results["precision"] = PRECISION_NAMES[precision.dtype]
    return results


# bench.py's own numeric flags' (low, high) bounds, as config.py's fields have theirs
FLAG_BOUNDS = {"seconds": (1e-3, 10 ** 6), "decode_sentences": (1, 10 ** 7), "decode_beam": FIELD_BOUNDS["beam"],
               "profile_steps": (0, 10 ** 6)}


def build_parser():
    parser = OneLineParser(add_help=False)
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per variant")
    parser.add_argument("--decode_sentences", type=int, default=200, help="validation sentences to decode")
    parser.add_argument("--decode_beam", type=int, default=4, help="beam size for the beam-search speed")
    parser.add_argument("--profile_steps", type=int, default=0, help="profile this many default steps (0 = none)")
    parser.add_argument("--variants", help="comma-separated variants to run (default: all; none: only decode)")
    parser.add_argument("--decode_checkpoint", help="decode with this trained checkpoint's weights instead of the "
                                                    "briefly trained benchmark weights (whose outputs stop early), "
                                                    "in every engine and precision, with BLEU")
    parser.add_argument("--decode_file", help="with --decode_checkpoint: the pairs to translate and score (default: "
                                              "the validation split of --data_files)")
    return parser


@one_line_errors
def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    parser.check_bounds(args, FLAG_BOUNDS)  # before minutes of training, not after
    cfg = Config.from_args(rest, prog="bench.py")
    if args.decode_checkpoint is not None and not os.path.isfile(args.decode_checkpoint):
        raise RunError(f"--decode_checkpoint {args.decode_checkpoint}: no such file")
    if args.decode_checkpoint is not None:  # every field checked before minutes of training, not after
        load_checkpoint(args.decode_checkpoint)
    if args.decode_file is not None and args.decode_checkpoint is None:
        raise RunError("--decode_file needs --decode_checkpoint, the model to decode it with")
    if args.decode_file is not None:
        dataset.check_data_file(args.decode_file)
    if not cfg.data_files:
        raise RunError("bench.py needs --data_files (local pairs; the benchmark never downloads)")
    _, _, device = runtime.setup_distributed(cfg)
    data = dataset.prepare_data(cfg, log=log)
    longest = tuple(int(side.max()) for side in data.train.lengths())
    # the amp variants: fp16 + GradScaler on CUDA; bf16 on a CPU where its products run faster than fp32's, else
    # fp32 (a CPU without bf16 units runs them at a fraction of its fp32 speed)
    amp = "fp16" if device.type == "cuda" else "bf16" if runtime.amp_dtype("auto", device) else "off"
    reference = dict(batching="random", max_tokens=0, amp="off", dropout=0.1, attn_dropout=0.1, ema_decay=0)
    variants = {"default": {}, "fixed": reference, "dynamic": reference,
                "bucketed": dict(amp="off", batching="bucketed"), "bucketed_amp": dict(amp=amp, batching="bucketed"),
                "packed": dict(amp="off", batching="packed"), "packed_amp": dict(amp=amp, batching="packed")}
    if device.type == "cuda":  # the default's CUDA graph against the same step launched kernel by kernel
        variants.update(packed_bf16_eager=dict(amp="bf16", batching="packed", cuda_graph=False),
                        packed_amp_compile=dict(amp=amp, batching="packed", compile=True))
    # the default first, compile (minutes of compiling) last: a run cut short has measured what matters most
    chosen = [] if args.variants == "none" else args.variants.split(",") if args.variants else sorted(
        [*variants, *LOADER_TOKENS], key=lambda name: (name != "default", "compile" in name))
    unknown = set(chosen) - set(variants) - set(LOADER_TOKENS)
    if unknown:
        raise RunError(f"--variants: no variant {', '.join(sorted(unknown))}; choose from "
                       f"{', '.join([*variants, *LOADER_TOKENS])}")
    resolved = runtime.resolve_autos(cfg, device, data.n_train_pairs)
    emit({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
          "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds_per_variant": args.seconds,
          "data_files": cfg.data_files, "training_pairs": len(data.train),
          "config": {k: getattr(resolved, k) for k in ("tokenizer", "d_model", "n_heads", "d_ff", "n_layers",
                                                       "n_decoder_layers", "n_unique_layers", "share", "ema_decay",
                                                       "batch_size", "max_tokens", "batching", "amp", "pack_length",
                                                       "pad_multiple", "attn_dropout", "lr", "batch_shape",
                                                       "cuda_graph")},
          "amp_auto": PRECISION_NAMES[runtime.amp_dtype("auto", device)]})  # what --amp auto chose here
    if args.profile_steps:  # first: on a GPU the default step's profile is the figure that matters most
        emit({"profile": profile_steps(resolved, data, device, args.profile_steps)})
    results, peaks, model = {}, {}, None
    for name in chosen:
        if name.startswith("loader"):
            result = measure_loader(dataclasses.replace(cfg, max_tokens=LOADER_TOKENS[name]), data, args.seconds)
            log(f"{name}: the input pipeline alone delivers {result['real_tokens_per_sec']:,.0f} real tokens/s")
            emit({"variant": name, **result})
            continue
        variant_cfg = runtime.resolve_autos(dataclasses.replace(cfg, **variants[name]), device, data.n_train_pairs)
        results[name], model = run_variant(name, variant_cfg, data, device, args.seconds, peaks,
                                           longest if name == "fixed" else None)
        emit({"variant": name, **results[name]})
    if "dynamic" in results:
        baseline = results["dynamic"]["real_tokens_per_sec"]
        emit({"ratios_vs_dynamic": {name: r["real_tokens_per_sec"] / baseline for name, r in results.items()},
              "peak_flops": peaks})
    if model is None and not args.decode_checkpoint:
        return
    sources, ids = [data.val.source(i) for i in range(min(args.decode_sentences, len(data.val)))], data.ids
    decoding = {}
    if args.decode_checkpoint:
        model, src_tokenizer, tgt_tokenizer, _ = load_translator(args.decode_checkpoint, device)
        sources = dataset.encode(src_tokenizer, [source for source, _ in data.val_pairs[:args.decode_sentences]])
        ids = dataset.special_ids(tgt_tokenizer)
        decoding["decoding_checkpoint"] = args.decode_checkpoint
    model.eval()
    decoding["decoding"] = decoding_speeds(model, sources, ids, cfg, args.decode_beam,
                                           runtime.Precision(device, runtime.amp_dtype(cfg.amp, device)))
    if args.decode_checkpoint:  # every engine and precision translate.py offers, with the BLEU each reaches
        emit(decoding)
        pairs = (dataset.read_pairs([args.decode_file], cfg.lang_src, cfg.lang_tgt, strict=True)[0] if args.decode_file
                 else data.val_pairs)[:args.decode_sentences]
        for line in compare_engines(args.decode_checkpoint, pairs, device, args.decode_beam):
            emit(line)
        return
    # every precision translate.py offers here: --amp off / bf16 / fp16, and --int8 on a CPU
    offered = {"fp32": (model, None), "bf16": (model, torch.bfloat16)}
    offered.update({"fp16": (model, torch.float16)} if device.type == "cuda" else
                   {"int8": (int8_linear_layers(model), None)})
    decoding["decoding_by_precision"] = {
        name: decoding_speeds(variant, sources, ids, cfg, args.decode_beam, runtime.Precision(device, dtype),
                              uncached=False)
        for name, (variant, dtype) in offered.items()}
    emit(decoding)


def compare_engines(path, pairs, device, beam, repeats=3):
    """One record per engine, precision and search (greedy, beam) for translate.py's path on these pairs: the
    PyTorch model in fp32, bf16 (or fp16 on CUDA) and int8 (a CPU), and CTranslate2 in float32 and int8 (where
    installed), each with its BLEU and its sentences/s: the median of `repeats` passes after one untimed pass
    (which fills the engines' caches and memory pools), text in and text out, all in this one process. Each
    CTranslate2 engine is built just before its rows and let go after them."""
    model, src_tokenizer, tgt_tokenizer, saved = load_translator(path, device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    engines = {"torch_fp32": lambda: (model, None), f"torch_{PRECISION_NAMES[half]}": lambda: (model, half)}
    if device.type == "cpu":
        engines["torch_int8"] = lambda: (int8_linear_layers(model), None)
    texts, references = [source for source, _ in pairs], [target for _, target in pairs]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            directory = export.export(path, scratch + "/model")
            for name, int8 in (("float32", False), ("int8", True)):
                engines[f"ctranslate2_{name}"] = lambda int8=int8: (export.Engine(directory, device, int8), None)
        except RunError as error:  # not installed: the PyTorch rows still come
            log(f"ctranslate2 rows left out: {error}")
        for name, build in engines.items():
            engine, dtype = build()
            for search_beam in (1, beam):
                speeds = []
                for _ in range(repeats + 1):
                    started = time.perf_counter()
                    with runtime.autocast(device, dtype):
                        hypotheses = translate_texts(texts, engine, src_tokenizer, tgt_tokenizer,
                                                     saved["tokenizer"] == "word", beam=search_beam,
                                                     alpha=saved["length_penalty"], max_len_a=saved["max_len_a"],
                                                     max_len_b=saved["max_len_b"], warn=log)
                    runtime.synchronize(device)
                    speeds.append(len(texts) / (time.perf_counter() - started))
                yield {"engine": name, "beam": search_beam, "sentences": len(texts),
                       "sentences_per_sec": statistics.median(speeds[1:]),
                       "bleu": score(hypotheses, references)["bleu"]}
            del engine


if __name__ == "__main__":
    main()
