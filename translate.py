"""Translate with a trained checkpoint.

    python translate.py --checkpoint runs/opus_books/best.pt "I am tired." "Where is the station?"
    echo "I am tired." | python translate.py --checkpoint best.pt --beam 4
    python translate.py --checkpoint best.pt --eval pairs.jsonl     # prints {"n", "bleu", "chrf", ...}
    python translate.py --engine ctranslate2 --model DIR "I am tired."   # DIR: written by export.py

One translation per input (argument or stdin line), in input order; an empty line gives an empty line.
A line longer than the model takes (max_positions) is cut, and stderr says which.
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time

import torch

import dataset
from checkpoint import load_translator
from config import AMP_MODES, DEVICES, FIELD_BOUNDS, OneLineParser, is_text
from errors import RunError, one_line_errors
from export import Engine, export
from metrics import score
from model import int8_linear_layers, translate
from runtime import amp_dtype, autocast

# The numeric flags' (low, high) bounds, as config.py's fields have theirs
FLAG_BOUNDS = {**{name: FIELD_BOUNDS[name] for name in ("beam", "length_penalty", "max_len_a", "max_len_b")},
               "max_len": FIELD_BOUNDS["max_len_b"], "max_tokens": (1, FIELD_BOUNDS["max_tokens"][1])}


def fit_to_model(sources, max_positions, names, warn):
    """Cut sources the model cannot take (it needs room for EOS) and say on stderr which inputs were cut."""
    for ids, name in zip(sources, names):
        if len(ids) >= max_positions:
            warn(f"warning: {name} has {len(ids)} tokens, more than the model takes "
                 f"(max_positions {max_positions}); translated its first {max_positions - 1} tokens")
            del ids[max_positions - 1:]
    return sources


def translate_texts(texts, model, src_tokenizer, tgt_tokenizer, word_level, beam=1, alpha=0.6, max_len_a=1.2,
                    max_len_b=10, max_len=0, max_tokens=6000, warn=print, names=None):
    """One line of translation per text, in order. model: a Transformer, or an export.Engine (CTranslate2).
    names: how warnings call each text (default: input line N)."""
    ids = dataset.special_ids(tgt_tokenizer)
    todo = [i for i, text in enumerate(texts) if text.strip()]
    names = names or [f"input line {i + 1}" for i in range(len(texts))]
    sources = fit_to_model(dataset.encode(src_tokenizer, [texts[i].strip() for i in todo]), model.max_positions,
                           [names[i] for i in todo], warn)
    limits = dict(beam=beam, alpha=alpha, max_len_a=max_len_a, max_len_b=max_len_b, max_len=max_len,
                  max_tokens=max_tokens)
    if isinstance(model, Engine):
        outputs = model.translate(sources, **limits)
    else:
        outputs = translate(model, sources, ids["sos"], ids["eos"], **limits)
    results = [""] * len(texts)
    for i, output in zip(todo, outputs):
        results[i] = dataset.decode(tgt_tokenizer, output, word_level)
    return results


def write_output(lines):
    """Print lines on stdout as command-line tools do: a reader that closed the pipe (`| head -1`) ends the run
    quietly, a failed write (a full disk) or a closed stdout is one line, and either exits non-zero."""
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise RunError("standard output is closed; redirect it to a file instead")
    try:
        for line in lines:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except OSError as error:
        # what is still buffered must not be flushed again at exit, which would print a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(error, BrokenPipeError):
            raise SystemExit(128 + signal.SIGPIPE) from None
        raise RunError(f"could not write to standard output: {error.strerror}") from None


def read_stdin_lines():
    """Lines of standard input, split at line feeds alone: a line may hold a bare CR, U+2028 or a form feed, and
    still gives one line of output. A UTF-8 byte-order mark and Windows line endings are accepted."""
    texts, data = [], sys.stdin.buffer.read()
    for number, line in enumerate(data.removesuffix(b"\n").split(b"\n") if data else [], 1):
        line = line.removesuffix(b"\r")
        try:
            texts.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise RunError(f"standard input line {number} is not UTF-8; convert the text to UTF-8") from None
    return texts


def build_parser():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a best.pt or last.pt written by train.py")
    parser.add_argument("--engine", default="torch", choices=("torch", "ctranslate2"),
                        help="decode in PyTorch, or in CTranslate2 (--checkpoint converted in memory, or --model)")
    parser.add_argument("--model", metavar="DIR", help="--engine ctranslate2: a directory written by export.py")
    parser.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    parser.add_argument("--length_penalty", type=float, default=0.6, help="GNMT length-penalty alpha for beam search")
    parser.add_argument("--max_len", type=int, default=0,
                        help="most tokens per translation (default 0: max_len_a * source tokens + max_len_b)")
    parser.add_argument("--max_len_a", type=float, help="default: the checkpoint's (config.py: 1.2)")
    parser.add_argument("--max_len_b", type=int, help="default: the checkpoint's (config.py: 10)")
    parser.add_argument("--max_tokens", type=int, default=6000, help="source tokens (x beam) decoded per batch")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--amp", default="auto", choices=AMP_MODES,
                        help="autocast dtype; auto: as train.py (bf16, else fp16, on CUDA; the faster of bf16 and "
                             "fp32 on a CPU)")
    parser.add_argument("--int8", action="store_true", help="CPU only: int8 weights in the Linear layers (dynamic "
                        "quantization; faster, BLEU within a few tenths; implies --amp off)")
    parser.add_argument("--eval", metavar="FILE", help="score translations of a .jsonl (opus_books rows) or .tsv "
                                                       "(source<TAB>reference) file with sacrebleu; prints JSON")
    parser.add_argument("texts", nargs="*", help="sentences to translate (default: one per line of stdin)")
    return parser


@one_line_errors
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    parser.check_bounds(args, FLAG_BOUNDS)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda but no CUDA device is available; use --device cpu")
    if (args.checkpoint is None) == (args.model is None) or (args.model is not None and args.engine != "ctranslate2"):
        parser.error("name a --checkpoint, or with --engine ctranslate2 a --model directory (export.py)")
    if args.eval is not None and args.texts:
        parser.error("--eval scores a file's translations; pass the texts to translate without --eval")
    if args.int8 and device.type != "cpu":
        parser.error("--int8 is for CPU inference; add --device cpu")
    options = dict(beam=args.beam, alpha=args.length_penalty, max_len=args.max_len, max_tokens=args.max_tokens,
                   warn=lambda message: print(message, file=sys.stderr))
    with contextlib.ExitStack() as stack:
        if args.engine == "ctranslate2":
            directory = args.model if args.model is not None else export(
                args.checkpoint, stack.enter_context(tempfile.TemporaryDirectory()) + "/model")
            model = Engine(directory, device, args.int8)
            (src_tokenizer, tgt_tokenizer), cfg = model.tokenizers, model.settings
            dtype, precision = None, contextlib.nullcontext()
        else:
            model, src_tokenizer, tgt_tokenizer, cfg = load_translator(args.checkpoint, device)
            model = int8_linear_layers(model) if args.int8 else model
            dtype = None if args.int8 else amp_dtype(args.amp, device)
            precision = autocast(device, dtype)
    word_level = cfg["tokenizer"] == "word"
    options.update(max_len_a=cfg["max_len_a"] if args.max_len_a is None else args.max_len_a,
                   max_len_b=cfg["max_len_b"] if args.max_len_b is None else args.max_len_b)

    if args.eval is not None:
        pairs, wheres = dataset.read_pairs([args.eval], cfg["lang_src"], cfg["lang_tgt"], strict=True)
        started = time.time()
        with precision:
            hypotheses = translate_texts([s for s, _ in pairs], model, src_tokenizer, tgt_tokenizer, word_level,
                                         names=wheres, **options)
        seconds = time.time() - started
        write_output([json.dumps({"n": len(pairs), **score(hypotheses, [t for _, t in pairs]),
                                  "sentences_per_sec": len(pairs) / seconds, "beam": args.beam, "engine": args.engine,
                                  "amp": str(dtype or "off").removeprefix("torch."), "int8": args.int8})])
        return
    texts = args.texts or read_stdin_lines()
    for number, text in enumerate(args.texts, 1):  # bytes that are not UTF-8 reach argv as lone surrogates
        if not is_text(text):
            raise RunError(f"argument {number} is not UTF-8 text; convert it, or pass the text on stdin")
    with precision:
        translations = translate_texts(texts, model, src_tokenizer, tgt_tokenizer, word_level, **options)
    write_output(translations)


if __name__ == "__main__":
    main()
