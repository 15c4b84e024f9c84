"""Every hyperparameter in one dataclass. Edit the defaults here or pass `--field value` flags."""
import argparse
import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field

SHARE_LAYOUTS = ("none", "sequence", "cycle", "cycle_rev")
TOKENIZERS = ("auto", "word", "bpe")
AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cuda", "cpu")
BATCHINGS = ("packed", "bucketed", "random")
BATCH_SHAPES = ("auto", "fixed", "varied")
ANNEAL_STRATEGIES = ("cos", "linear")
DATA_FILE_TYPES = (".jsonl", ".json", ".tsv", ".parquet")
QUANTIZATIONS = ("float32", "int8", "int16", "float16")  # export.py's weight types
# GNMT's length penalty ((5 + length) / 6) ** alpha: beyond this it overflows a float for long outputs, and
# published settings lie between 0.6 and 2
MAX_LENGTH_PENALTY = 10
# A hub dataset's name or a language key: what the hub's names allow, and what a row's "translation" dict is keyed by
NAME_PATTERN = r"[A-Za-z0-9_.\-]{1,96}"
# tokenizer=auto takes word-level vocabularies below this many training pairs and one joint BPE vocabulary from
# there on (docs/experiments.md, "The large set"): on the 17k-pair small set words scored 4-8 BLEU above subwords,
# on the 165k-pair large set subwords scored above words and decoded faster.
LARGE_DATA_PAIRS = 50_000


def tokenizer_for(tokenizer, n_train_pairs):
    """word or bpe: the --tokenizer flag, with auto decided by the size of the training split."""
    if tokenizer != "auto":
        return tokenizer
    return "bpe" if n_train_pairs >= LARGE_DATA_PAIRS else "word"


# Every field with an auto setting, and its marker: "auto" for a text field; for a number, a value its help names
# (0 or -1) that is not a setting of its own. On the command line each is `--field auto`; the start-up log's
# "autos:" line shows what each became.
AUTO_MARKERS = {"tokenizer": "auto", "batch_shape": "auto", "amp": "auto", "device": "auto", "data_cache": "auto",
                "epochs": 0, "max_tokens": -1, "lr": 0.0, "dropout": -1.0, "pad_multiple": 0, "num_workers": -1,
                "eval_every_minutes": 0.0}
# The autos a resumed run takes from its checkpoint, so batches and schedule stay the same; a new run resolves them
# for its device and the size of its training split (runtime.resolve_autos; epochs: train.py). A tie is concrete
# either way: it holds where the vocabulary is joint.
AUTO_VALUES = {**{name: AUTO_MARKERS[name] for name in ("epochs", "max_tokens", "batch_shape", "lr", "dropout",
                                                        "tokenizer")}, "tie_embeddings": True}
# The fields that describe the model's architecture: a checkpoint's config rebuilds its model from them.
MODEL_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "n_decoder_layers", "n_unique_layers", "share",
                "tie_embeddings", "dropout", "attn_dropout", "max_positions")


def section(group):
    """The field maker of one group of flags (how --help lists them): FIELD(default, help, choices=None,
    bounds=None). Every int and float field has bounds (low, high), both allowed: what the libraries it reaches
    can hold (tokenizers' u32 and u64, torch's int64 seeds and sizes), and far beyond any use."""
    def make_field(default, help, choices=None, bounds=None):
        metadata = {"group": group, "help": help, "choices": choices, "bounds": bounds}
        if isinstance(default, list):
            return field(default_factory=lambda: list(default), metadata=metadata)
        return field(default=default, metadata=metadata)
    return make_field


def out_of_bounds(name, value, bounds):
    """The one-line complaint about --name's value, or None where it is a finite number within bounds."""
    low, high = bounds
    if isinstance(value, float) and not math.isfinite(value):
        return f"--{name} must be a finite number from {low:,} to {high:,} (got {value})"
    if not low <= value <= high:
        return f"--{name} must be from {low:,} to {high:,} (got {value:,})"
    return None


def is_text(text):
    """Whether a string can be written as UTF-8: JSON's "\\ud800" escape decodes to a lone surrogate, and bytes
    that are not UTF-8 reach argv as lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text, limit=60):
    """A value quoted in a message: its repr, cut to `limit` characters (a 5,000-character path stays one line)."""
    text = repr(text)
    return text if len(text) <= limit else f"{text[:limit]}...' ({len(text):,} characters)"


TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
              list[str]: "a list of strings"}
DATA, MODEL, OPTIMISATION, SYSTEM, EVALUATION = map(section, ("data", "model", "optimisation", "system", "evaluation"))


@dataclass
class Config:
    dataset: str = DATA("opus_books", "Hugging Face dataset (Helsinki-NLP/<name>); ignored when data_files is set")
    lang_src: str = DATA("en", 'source language key in the rows\' "translation" dict')
    lang_tgt: str = DATA("fr", 'target language key in the rows\' "translation" dict')
    data_files: list[str] = DATA([], "local .jsonl/.json/.tsv/.parquet files, directories of them or globs such as "
                                     "'shards/*.jsonl'; empty = the hub dataset")
    val_fraction: float = DATA(0.03, "share of pairs held out for validation (seeded, stable split)", bounds=(0, 1))
    max_val_pairs: int = DATA(1000, "at most this many of them (the rest train): evaluation stays cheap on large data "
                                    "(0 = no cap)", bounds=(0, 2 ** 31 - 1))
    sampling_temperature: float = DATA(1.0, "draw each epoch's training pairs from the data files in proportion to "
                                            "their size ** (1 / T): 1 = as they are, larger = closer to uniform; an "
                                            "epoch stays as many pairs as the training split", bounds=(1, 100))
    max_src_tokens: int = DATA(150, "drop training pairs whose source has more tokens than this", bounds=(1, 2 ** 16))
    max_len_ratio: float = DATA(1.5, "drop training pairs whose target has more than max_len_ratio x source + "
                                     "max_len_diff tokens (the reference: 1)", bounds=(0, 100))
    max_len_diff: int = DATA(10, "see max_len_ratio", bounds=(0, 2 ** 16))
    max_positions: int = DATA(1024, "longest sequence the model accepts (sinusoidal table size)", bounds=(1, 2 ** 16))
    tokenizer: str = DATA("auto", "word: one word-level vocabulary per language; bpe: one joint subword vocabulary; "
                                  "auto: bpe from 50,000 training pairs on, else word", choices=TOKENIZERS)
    vocab_size: int = DATA(8000, "joint vocabulary size for tokenizer=bpe", bounds=(1, 2 ** 21))
    min_frequency: int = DATA(2, "a word needs this many occurrences to enter a word-level vocabulary",
                              bounds=(1, 2 ** 32 - 1))
    lowercase_source: bool = DATA(True, 'word tokenizer: fold the source\'s case ("Forget it!" reads as "forget it!")')
    tokenizer_sample_pairs: int = DATA(200_000, "tokenizers learn from at most this many training pairs, a seeded "
                                                "sample of a larger corpus (0 = all)", bounds=(0, 2 ** 31 - 1))
    data_cache: str = DATA("auto", "where prepared data is kept, memory-mapped, for every later run and DDP rank: "
                                   "auto = $XDG_CACHE_HOME (or ~/.cache)/transformer-en-fr/data, a directory, or "
                                   "off = in memory, prepared again by every run")
    d_model: int = MODEL(256, "width of embeddings and residual stream", bounds=(2, 2 ** 14))
    n_heads: int = MODEL(8, "attention heads; must divide d_model", bounds=(1, 2 ** 10))
    d_ff: int = MODEL(512, "hidden width of the feed-forward sublayer (the reference: 128)", bounds=(1, 2 ** 16))
    n_layers: int = MODEL(6, "layers in the encoder (and in the decoder, unless n_decoder_layers says otherwise)",
                          bounds=(1, 2 ** 10))
    n_decoder_layers: int = MODEL(1, "layers in the decoder (0 = n_layers): a shallow one decodes and trains faster",
                                  bounds=(0, 2 ** 10))
    n_unique_layers: int = MODEL(3, "distinct blocks each stack's layers are drawn from (ignored when share=none)",
                                 bounds=(1, 2 ** 10))
    share: str = MODEL("cycle_rev", "cross-layer sharing (Takase & Kiyono 2021)", choices=SHARE_LAYOUTS)
    tie_embeddings: bool = MODEL(True, "one matrix for source, target and output embeddings where the vocabulary is "
                                       "joint (bpe); word-level vocabularies are two and stay untied")
    dropout: float = MODEL(
        -1.0, "dropout on embeddings, residual branches and FF hidden layer (-1 = auto: CUDA 0.1, CPU 0)",
        bounds=(-1, 1))
    attn_dropout: float = MODEL(0.0, "dropout on attention weights (> 0 keeps SDPA off its fused CPU kernel)",
                                bounds=(0, 1))
    epochs: int = OPTIMISATION(0, "passes over the training split (0 = auto: 10, or no limit when max_minutes is set)",
                               bounds=(0, 10 ** 6))
    max_steps: int = OPTIMISATION(0, "stop after this many optimizer steps (0 = no limit)", bounds=(0, 10 ** 12))
    max_minutes: float = OPTIMISATION(0.0, "training-time budget: the schedule is sized to end on time (0 = off)",
                                      bounds=(0, 10 ** 7))
    batch_size: int = OPTIMISATION(32, "sentences per batch when max_tokens = 0", bounds=(1, 2 ** 20))
    accum_steps: int = OPTIMISATION(1, "batches per optimizer step (gradient accumulation; 1 = none)",
                                    bounds=(1, 2 ** 12))
    max_tokens: int = OPTIMISATION(
        -1, "source + target tokens per batch (0 = batch_size sentences; -1 = auto: CPU 0, CUDA 16384)",
        bounds=(-1, 2 ** 24))
    batching: str = OPTIMISATION(
        "packed", "packed (random batches packed into rows), bucketed (similar lengths) or random", choices=BATCHINGS)
    batch_shape: str = OPTIMISATION(
        "auto", "packed rows: fixed (one shape for CUDA graphs) or varied (auto: fixed on CUDA)", choices=BATCH_SHAPES)
    pack_length: int = OPTIMISATION(
        64, "packed: tokens a side per row, or its longest sentence (wider: less pad, more attention)",
        bounds=(1, 2 ** 16))
    bucket_pool: int = OPTIMISATION(
        1000, "bucketed: batches' worth of shuffled examples sorted together (smaller = more random)",
        bounds=(1, 2 ** 20))
    pad_multiple: int = OPTIMISATION(
        0, "pad batch widths to a multiple of this (0 = auto: 8 on CUDA or packed, else 1)", bounds=(0, 2 ** 10))
    lr: float = OPTIMISATION(
        0.0, "OneCycle peak learning rate (0 = auto: 1e-3, x sqrt(max_tokens / 2048) above 2048 tokens)",
        bounds=(0, 10))
    weight_decay: float = OPTIMISATION(0.01, "AdamW weight decay", bounds=(0, 10))
    decay_norms_and_biases: bool = OPTIMISATION(
        False, "weight decay also on LayerNorm weights and biases (reference); false: on matrices and embeddings only")
    pct_start: float = OPTIMISATION(0.1, "share of steps spent warming up to the peak lr", bounds=(0, 1))
    three_phase: bool = OPTIMISATION(
        False, "OneCycle: also anneal back to the initial lr before the final decay (reference)")
    cycle_momentum: bool = OPTIMISATION(
        False, "OneCycle: also cycle AdamW's beta1 between 0.95 and 0.85 (reference; the CUDA graph needs false)")
    anneal_strategy: str = OPTIMISATION(
        "cos", "OneCycle annealing (reference: linear)", choices=ANNEAL_STRATEGIES)
    div_factor: float = OPTIMISATION(10.0, "initial lr = lr / div_factor", bounds=(0, 10 ** 9))
    final_div_factor: float = OPTIMISATION(10.0, "final lr = initial lr / final_div_factor", bounds=(0, 10 ** 9))
    label_smoothing: float = OPTIMISATION(0.1, "label smoothing of the cross-entropy loss", bounds=(0, 1))
    grad_clip: float = OPTIMISATION(1.0, "clip the global gradient norm to this (0 = off)", bounds=(0, 10 ** 6))
    ema_decay: float = OPTIMISATION(
        0.998, "evaluate and save this moving average of the weights (0 = off: the trained ones)", bounds=(0, 1))
    nan_patience: int = OPTIMISATION(3, "stop after this many consecutive steps with a non-finite loss",
                                     bounds=(1, 10 ** 6))
    amp: str = SYSTEM("auto", "auto (CUDA: bf16, else fp16; CPU: bf16 where measured faster than fp32), fp16, bf16, "
                              "off", choices=AMP_MODES)
    compile: bool = SYSTEM(False, "torch.compile the model for training")
    cuda_graph: bool = SYSTEM(True, "replay each step as one CUDA graph (fixed batch_shape, bf16/fp32, one process)")
    device: str = SYSTEM("auto", "auto: cuda if available", choices=DEVICES)
    seed: int = SYSTEM(42, "seeds the split, the batches, initialisation and dropout", bounds=(0, 2 ** 63 - 1))
    num_workers: int = SYSTEM(-1, "DataLoader worker processes (-1 = auto: 2 on CUDA, 0 on a CPU, whose cores train)",
                              bounds=(-1, 2 ** 7))
    run_dir: str = SYSTEM("runs/opus_books", "where checkpoints, metrics and TensorBoard logs go")
    resume: str = SYSTEM("", '"" = fresh run, "auto" = run_dir/last.pt if it exists, or a checkpoint path')
    overwrite: bool = SYSTEM(False, "a fresh run may replace the run already in run_dir (else it is refused: "
                                    "nothing finished is ever lost by a rerun)")
    log_every: int = SYSTEM(50, "steps between progress-bar and TensorBoard updates", bounds=(1, 10 ** 9))
    eval_every_minutes: float = EVALUATION(
        0.0, "evaluate and save after this much training, within an epoch too (0 = auto: every epoch or 10 minutes, "
             "whichever comes first; with max_minutes, five times in it)", bounds=(0, 10 ** 7))
    eval_files: list[str] = EVALUATION([], "more sets (.jsonl/.tsv/...) scored whole at every evaluation beside the "
                                           "validation split; training pairs with one of their sources are dropped")
    n_eval_sentences: int = EVALUATION(
        500, "validation sentences translated per evaluation: BLEU/chrF/CER/WER; BLEU picks best.pt",
        bounds=(0, 2 ** 31 - 1))
    beam: int = EVALUATION(1, "beam size for evaluation translations (1 = greedy)", bounds=(1, 2 ** 7))
    length_penalty: float = EVALUATION(0.6, "GNMT length-penalty alpha for beam search", bounds=(0, MAX_LENGTH_PENALTY))
    max_len_a: float = EVALUATION(1.2, "a translation has at most max_len_a * source tokens + max_len_b tokens",
                                  bounds=(0, 2 ** 16))
    max_len_b: int = EVALUATION(10, "see max_len_a", bounds=(0, 2 ** 16))

    def validate(self):
        """Raise ValueError with a one-line message naming the flag to change."""
        def require(ok, message):
            if not ok:
                raise ValueError(message)

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, bounds = getattr(self, f.name), f.metadata["bounds"]
            if hints[f.name] in (int, float):
                require(bounds is not None, f"config.py: field {f.name} needs bounds=(low, high)")
                complaint = out_of_bounds(f.name, value, bounds)
                require(complaint is None, complaint)
            for text in value if isinstance(value, list) else [value]:
                require(not isinstance(text, str) or is_text(text), f"--{f.name} must be UTF-8 text (got "
                                                                     f"{shown(text)})")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            require(choices is None or getattr(self, f.name) in choices,
                    f"--{f.name} must be one of {', '.join(choices or ())} (got {shown(getattr(self, f.name))})")
        for name in ("dataset", "lang_src", "lang_tgt"):
            require(re.fullmatch(NAME_PATTERN, getattr(self, name)) is not None,
                    f"--{name} must be 1 to 96 letters, digits, '_', '-' or '.' (got {shown(getattr(self, name))})")
        require(self.lang_src != self.lang_tgt, f"--lang_src and --lang_tgt must differ (both {self.lang_src!r})")
        require(self.run_dir != "", "--run_dir must name a directory (got '')")
        require(self.d_model % 2 == 0, f"--d_model must be even: the position table pairs a sine with a cosine "
                                       f"(got {self.d_model})")
        require(self.d_model % self.n_heads == 0,
                f"--n_heads must divide --d_model (got {self.d_model} and {self.n_heads})")
        longest_target = self.max_len_ratio * self.max_src_tokens + self.max_len_diff
        require(longest_target < self.max_positions,
                f"--max_positions must exceed --max_len_ratio x --max_src_tokens + --max_len_diff, the longest "
                f"training target (got {self.max_positions} <= {self.max_len_ratio:g} x {self.max_src_tokens} + "
                f"{self.max_len_diff})")
        require(self.n_unique_layers <= self.n_layers,
                f"--n_unique_layers must not exceed --n_layers (got {self.n_unique_layers} > {self.n_layers})")
        require(0 < self.val_fraction < 1, f"--val_fraction must be between 0 and 1 (got {self.val_fraction})")
        require(self.dropout == -1 or 0 <= self.dropout < 1,
                f"--dropout must be -1 (auto) or at least 0 and below 1 (got {self.dropout})")
        require(self.attn_dropout < 1, f"--attn_dropout must be below 1 (got {self.attn_dropout})")
        require(self.max_len_a > 0 or self.max_len_b > 0, "--max_len_a or --max_len_b must be positive")
        require(self.ema_decay < 1, f"--ema_decay must be below 1 (got {self.ema_decay})")
        require(self.label_smoothing < 1, f"--label_smoothing must be below 1 (got {self.label_smoothing})")
        require(0 < self.pct_start < 1, f"--pct_start must be between 0 and 1 (got {self.pct_start})")
        require(self.div_factor > 0 and self.final_div_factor > 0,
                "--div_factor and --final_div_factor must be positive")
        require(self.max_tokens in (-1, 0) or self.max_tokens >= 16,
                f"--max_tokens must be -1 (auto), 0 or at least 16 (got {self.max_tokens})")
        require(self.batch_shape != "fixed" or (self.batching == "packed" and self.max_tokens != 0),
                "--batch_shape fixed needs --batching packed and a token budget (--max_tokens -1 or at least 16)")
        for name in ("data_files", "eval_files"):
            for path in getattr(self, name):
                require(path.endswith(DATA_FILE_TYPES) or (name == "data_files" and os.path.isdir(path)),
                        f"--{name} takes {', '.join(DATA_FILE_TYPES)} files"
                        + (", directories of them or globs" if name == "data_files" else "") + f" (got {shown(path)})")
        require(self.data_cache.strip() != "", "--data_cache must be auto, off or a directory")

    def with_autos_from(self, saved):
        """This config with each field left at auto taking its value in `saved` (a checkpoint's config dict)."""
        return dataclasses.replace(self, **{name: saved[name] for name, auto in AUTO_VALUES.items()
                                            if getattr(self, name) == auto and name in saved})

    @classmethod
    def from_stored(cls, values):
        """A Config from stored values (a checkpoint's config), each of its field's type as the command line types
        it: bool, int and float kept apart (an int field's 32.0 is refused; a float field takes 32), then validated.
        Raises ValueError naming the field."""
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            kind = hints[name]
            if kind == list[str]:
                typed = type(value) is list and all(type(item) is str for item in value)
            else:
                typed = type(value) is kind or (kind is float and type(value) is int)
            if not typed:
                raise ValueError(f"--{name} is {shown(value)}, not {TYPE_NAMES[kind]}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_args(cls, argv=None, prog=None):
        """Build a Config from `--field value` flags; bad flags or values exit with one line."""
        parser = OneLineParser(prog=prog, usage="%(prog)s [--field value ...]",
                               description="Every flag is a field of config.Config; edit its defaults there. A "
                                           "default of auto is worked out at start-up for the device and the data "
                                           "(the log's autos: line shows each); `--field auto` asks for it, and "
                                           "config.py writes a number's auto as the value its help names.")
        hints = typing.get_type_hints(cls)
        groups = {}
        for f in dataclasses.fields(cls):
            group = groups.get(f.metadata["group"]) or groups.setdefault(
                f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            auto = f.name in AUTO_MARKERS and default == AUTO_MARKERS[f.name]
            kind, help_text = hints[f.name], f"{f.metadata['help']} (default: {'auto' if auto else default})"
            if kind is bool:
                group.add_argument(f"--{f.name}", type=parse_bool, default=default, metavar="true|false",
                                   help=help_text)
            elif kind == list[str]:
                group.add_argument(f"--{f.name}", nargs="*", action="extend", default=default, metavar="FILE",
                                   help=help_text + "; repeating the flag adds files")
            elif f.name in AUTO_MARKERS and kind is not str:
                group.add_argument(f"--{f.name}", type=number_or_auto(kind, AUTO_MARKERS[f.name]), default=default,
                                   help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=kind, default=default, choices=f.metadata["choices"],
                                   help=help_text)
        config = cls(**vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))
        try:
            config.validate()
        except ValueError as error:
            parser.error(str(error))
        return config


FIELD_BOUNDS = {f.name: f.metadata["bounds"] for f in dataclasses.fields(Config)}  # what the scripts' flags reuse


def number_or_auto(kind, marker):
    """A flag's type: a number of this kind, or the word auto for the field's marker."""
    def parse(text):
        return marker if text.strip().lower() == "auto" else kind(text)
    parse.__name__ = kind.__name__  # what argparse names in "invalid int value: 'x'"
    return parse


def parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; we print the one line that says what to fix."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def check_bounds(self, args, flag_bounds):
        """Exit with one line at the first flag in flag_bounds ({name: (low, high)}) whose value is outside them
        (a flag left at None is not given)."""
        for name, bounds in flag_bounds.items():
            value = getattr(args, name)
            complaint = None if value is None else out_of_bounds(name, value, bounds)
            if complaint:
                self.error(complaint)
