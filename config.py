"""Every hyperparameter in one dataclass. Edit the defaults here or pass `--field value` flags."""
import argparse
import dataclasses
import math
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
# GNMT's length penalty ((5 + length) / 6) ** alpha: beyond this it overflows a float for long outputs, and
# published settings lie between 0.6 and 2
MAX_LENGTH_PENALTY = 10.0
# Upper bounds far beyond any use, so that a mistyped value stops at once, not after data preparation in an
# allocation failure or a Python overflow (torch seeds take 64 bits; a worker per core is the most that helps)
UPPER_BOUNDS = {"d_model": 2 ** 14, "n_heads": 2 ** 10, "d_ff": 2 ** 16, "n_layers": 2 ** 10,
                "n_decoder_layers": 2 ** 10, "n_unique_layers": 2 ** 10, "max_positions": 2 ** 16,
                "max_src_tokens": 2 ** 16, "max_len_diff": 2 ** 16, "vocab_size": 2 ** 21, "batch_size": 2 ** 20,
                "max_tokens": 2 ** 24, "pack_length": 2 ** 16, "accum_steps": 2 ** 12, "bucket_pool": 2 ** 20,
                "pad_multiple": 2 ** 10, "beam": 2 ** 7, "max_len_b": 2 ** 16, "seed": 2 ** 63 - 1,
                "num_workers": 2 ** 7, "epochs": 10 ** 6, "max_steps": 10 ** 12}
# tokenizer=auto takes word-level vocabularies below this many training pairs and one joint BPE vocabulary from
# there on (docs/experiments.md, "The large set"): on the 17k-pair small set words scored 4-8 BLEU above subwords,
# on the 165k-pair large set subwords scored above words and decoded faster.
LARGE_DATA_PAIRS = 50_000


def tokenizer_for(tokenizer, n_train_pairs):
    """word or bpe: the --tokenizer flag, with auto decided by the size of the training split."""
    if tokenizer != "auto":
        return tokenizer
    return "bpe" if n_train_pairs >= LARGE_DATA_PAIRS else "word"


# Fields whose default means "auto". A resumed run takes the values its checkpoint was trained with, so batches
# and schedule stay the same; a new run resolves them for its device and the size of its training split
# (runtime.resolve_autos; epochs: train.py). A tie is concrete either way: it holds where the vocabulary is joint.
AUTO_VALUES = {"epochs": 0, "max_tokens": -1, "batch_shape": "auto", "lr": 0.0, "dropout": -1.0, "tokenizer": "auto",
               "tie_embeddings": True}
# The fields that describe the model's architecture: a checkpoint's config rebuilds its model from them.
MODEL_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "n_decoder_layers", "n_unique_layers", "share",
                "tie_embeddings", "dropout", "attn_dropout", "max_positions")


def section(group):
    """The field maker of one group of flags (how --help lists them): FIELD(default, help, choices=None)."""
    def make_field(default, help, choices=None):
        metadata = {"group": group, "help": help, "choices": choices}
        if isinstance(default, list):
            return field(default_factory=lambda: list(default), metadata=metadata)
        return field(default=default, metadata=metadata)
    return make_field


DATA, MODEL, OPTIMISATION, SYSTEM, EVALUATION = map(section, ("data", "model", "optimisation", "system", "evaluation"))


@dataclass
class Config:
    dataset: str = DATA("opus_books", "Hugging Face dataset (Helsinki-NLP/<name>); ignored when data_files is set")
    lang_src: str = DATA("en", 'source language key in the rows\' "translation" dict')
    lang_tgt: str = DATA("fr", 'target language key in the rows\' "translation" dict')
    data_files: list[str] = DATA([], "local .jsonl/.tsv/.parquet files; empty = the hub dataset")
    val_fraction: float = DATA(0.03, "share of pairs held out for validation (seeded, stable split)")
    max_val_pairs: int = DATA(1000, "at most this many of them (the rest train): evaluation stays cheap on large data "
                                    "(0 = no cap)")
    max_src_tokens: int = DATA(150, "drop training pairs whose source has more tokens than this")
    max_len_diff: int = DATA(10, "drop training pairs whose target is longer than source + this (in tokens)")
    max_positions: int = DATA(1024, "longest sequence the model accepts (sinusoidal table size)")
    tokenizer: str = DATA("auto", "word: one word-level vocabulary per language; bpe: one joint subword vocabulary; "
                                  "auto: bpe from 50,000 training pairs on, else word", choices=TOKENIZERS)
    vocab_size: int = DATA(8000, "joint vocabulary size for tokenizer=bpe")
    min_frequency: int = DATA(2, "a word needs this many occurrences to enter a word-level vocabulary")
    lowercase_source: bool = DATA(True, 'word tokenizer: fold the source\'s case ("Forget it!" reads as "forget it!")')
    d_model: int = MODEL(256, "width of embeddings and residual stream")
    n_heads: int = MODEL(8, "attention heads; must divide d_model")
    d_ff: int = MODEL(128, "hidden width of the feed-forward sublayer")
    n_layers: int = MODEL(6, "layers in the encoder (and in the decoder, unless n_decoder_layers says otherwise)")
    n_decoder_layers: int = MODEL(1, "layers in the decoder (0 = n_layers): a shallow one decodes and trains faster")
    n_unique_layers: int = MODEL(3, "distinct blocks each stack's layers are drawn from (ignored when share=none)")
    share: str = MODEL("cycle_rev", "cross-layer sharing (Takase & Kiyono 2021)", choices=SHARE_LAYOUTS)
    tie_embeddings: bool = MODEL(True, "one matrix for source, target and output embeddings where the vocabulary is "
                                       "joint (bpe); word-level vocabularies are two and stay untied")
    dropout: float = MODEL(
        -1.0, "dropout on embeddings, residual branches and FF hidden layer (-1 = auto: CUDA 0.1, CPU 0)")
    attn_dropout: float = MODEL(0.0, "dropout on attention weights (> 0 keeps SDPA off its fused CPU kernel)")
    epochs: int = OPTIMISATION(0, "passes over the training split (0 = auto: 10, or no limit when max_minutes is set)")
    max_steps: int = OPTIMISATION(0, "stop after this many optimizer steps (0 = no limit)")
    max_minutes: float = OPTIMISATION(0.0, "training-time budget: the schedule is sized to end on time (0 = off)")
    batch_size: int = OPTIMISATION(32, "sentences per batch when max_tokens = 0")
    accum_steps: int = OPTIMISATION(1, "batches per optimizer step (gradient accumulation; 1 = none)")
    max_tokens: int = OPTIMISATION(
        -1, "source + target tokens per batch (0 = batch_size sentences; -1 = auto: CPU 0, CUDA 16384)")
    batching: str = OPTIMISATION(
        "packed", "packed (random batches packed into rows), bucketed (similar lengths) or random", choices=BATCHINGS)
    batch_shape: str = OPTIMISATION(
        "auto", "packed rows: fixed (one shape for CUDA graphs) or varied (auto: fixed on CUDA)", choices=BATCH_SHAPES)
    pack_length: int = OPTIMISATION(
        64, "packed: tokens a side per row, or its longest sentence (wider: less pad, more attention)")
    bucket_pool: int = OPTIMISATION(
        1000, "bucketed: batches' worth of shuffled examples sorted together (smaller = more random)")
    pad_multiple: int = OPTIMISATION(
        0, "pad batch widths to a multiple of this (0 = auto: 8 on CUDA or packed, else 1)")
    lr: float = OPTIMISATION(
        0.0, "OneCycle peak learning rate (0 = auto: 1e-3, x sqrt(max_tokens / 2048) above 2048 tokens)")
    weight_decay: float = OPTIMISATION(0.01, "AdamW weight decay")
    pct_start: float = OPTIMISATION(0.1, "share of steps spent warming up to the peak lr")
    three_phase: bool = OPTIMISATION(
        False, "OneCycle: also anneal back to the initial lr before the final decay (reference)")
    cycle_momentum: bool = OPTIMISATION(
        False, "OneCycle: also cycle AdamW's beta1 between 0.95 and 0.85 (reference; the CUDA graph needs false)")
    anneal_strategy: str = OPTIMISATION(
        "cos", "OneCycle annealing (reference: linear)", choices=ANNEAL_STRATEGIES)
    div_factor: float = OPTIMISATION(10.0, "initial lr = lr / div_factor")
    final_div_factor: float = OPTIMISATION(10.0, "final lr = initial lr / final_div_factor")
    label_smoothing: float = OPTIMISATION(0.1, "label smoothing of the cross-entropy loss")
    grad_clip: float = OPTIMISATION(1.0, "clip the global gradient norm to this (0 = off)")
    ema_decay: float = OPTIMISATION(
        0.998, "evaluate and save this moving average of the weights (0 = off: the trained ones)")
    nan_patience: int = OPTIMISATION(3, "stop after this many consecutive steps with a non-finite loss")
    amp: str = SYSTEM("auto", "auto (CUDA: bf16, else fp16; CPU: bf16 where measured faster than fp32), fp16, bf16, "
                              "off", choices=AMP_MODES)
    compile: bool = SYSTEM(False, "torch.compile the model for training")
    cuda_graph: bool = SYSTEM(True, "replay each step as one CUDA graph (fixed batch_shape, bf16/fp32, one process)")
    device: str = SYSTEM("auto", "auto: cuda if available", choices=DEVICES)
    seed: int = SYSTEM(42, "seeds the split, the batches, initialisation and dropout")
    num_workers: int = SYSTEM(-1, "DataLoader worker processes (-1 = auto: 2 on CUDA, 0 on a CPU, whose cores train)")
    run_dir: str = SYSTEM("runs/opus_books", "where checkpoints, metrics and TensorBoard logs go")
    resume: str = SYSTEM("", '"" = fresh run, "auto" = run_dir/last.pt if it exists, or a checkpoint path')
    overwrite: bool = SYSTEM(False, "a fresh run may replace the run already in run_dir (else it is refused: "
                                    "nothing finished is ever lost by a rerun)")
    log_every: int = SYSTEM(50, "steps between progress-bar and TensorBoard updates")
    eval_every_minutes: float = EVALUATION(
        0.0, "evaluate and save after this much training, within an epoch too (0 = auto: every epoch or 10 minutes, "
             "whichever comes first; with max_minutes, five times in it)")
    n_eval_sentences: int = EVALUATION(
        500, "validation sentences translated per evaluation: BLEU/chrF/CER/WER; BLEU picks best.pt")
    beam: int = EVALUATION(1, "beam size for evaluation translations (1 = greedy)")
    length_penalty: float = EVALUATION(0.6, "GNMT length-penalty alpha for beam search")
    max_len_a: float = EVALUATION(1.2, "a translation has at most max_len_a * source tokens + max_len_b tokens")
    max_len_b: int = EVALUATION(10, "see max_len_a")

    def validate(self):
        """Raise ValueError with a one-line message naming the flag to change."""
        def require(ok, message):
            if not ok:
                raise ValueError(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be a finite number "
                                                                            f"(got {value})")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            require(choices is None or getattr(self, f.name) in choices,
                    f"--{f.name} must be one of {', '.join(choices or ())} (got {getattr(self, f.name)!r})")
        require(self.lang_src != self.lang_tgt, f"--lang_src and --lang_tgt must differ (both {self.lang_src!r})")
        for name in ("d_model", "n_heads", "d_ff", "n_layers", "n_unique_layers", "batch_size",
                     "max_src_tokens", "max_positions", "vocab_size", "min_frequency", "pack_length", "accum_steps",
                     "bucket_pool", "nan_patience", "log_every", "beam"):
            require(getattr(self, name) >= 1, f"--{name} must be at least 1 (got {getattr(self, name)})")
        for name, bound in UPPER_BOUNDS.items():
            require(getattr(self, name) <= bound, f"--{name} must be at most {bound:,} (got {getattr(self, name):,})")
        require(self.seed >= 0, f"--seed must not be negative (got {self.seed})")
        require(self.num_workers >= -1, f"--num_workers must be -1 (auto) or more (got {self.num_workers})")
        for name in ("n_decoder_layers", "epochs", "max_steps", "max_minutes", "eval_every_minutes", "lr",
                     "max_len_diff", "n_eval_sentences", "max_val_pairs", "grad_clip", "ema_decay", "attn_dropout",
                     "weight_decay", "label_smoothing", "length_penalty", "max_len_a", "max_len_b", "pad_multiple"):
            require(getattr(self, name) >= 0, f"--{name} must not be negative (got {getattr(self, name)})")
        require(self.d_model % 2 == 0, f"--d_model must be even: the position table pairs a sine with a cosine "
                                       f"(got {self.d_model})")
        require(self.d_model % self.n_heads == 0,
                f"--n_heads must divide --d_model (got {self.d_model} and {self.n_heads})")
        require(self.max_src_tokens + self.max_len_diff < self.max_positions,
                f"--max_positions must exceed --max_src_tokens + --max_len_diff, the longest training target "
                f"(got {self.max_positions} <= {self.max_src_tokens} + {self.max_len_diff})")
        require(self.n_unique_layers <= self.n_layers,
                f"--n_unique_layers must not exceed --n_layers (got {self.n_unique_layers} > {self.n_layers})")
        require(0 < self.val_fraction < 1, f"--val_fraction must be between 0 and 1 (got {self.val_fraction})")
        require(self.dropout == -1 or 0 <= self.dropout < 1,
                f"--dropout must be -1 (auto) or at least 0 and below 1 (got {self.dropout})")
        require(self.attn_dropout < 1, f"--attn_dropout must be below 1 (got {self.attn_dropout})")
        require(self.max_len_a > 0 or self.max_len_b > 0, "--max_len_a or --max_len_b must be positive")
        require(self.length_penalty <= MAX_LENGTH_PENALTY,
                f"--length_penalty must be at most {MAX_LENGTH_PENALTY:g} (got {self.length_penalty:g})")
        require(self.ema_decay < 1, f"--ema_decay must be below 1 (got {self.ema_decay})")
        require(self.label_smoothing < 1, f"--label_smoothing must be below 1 (got {self.label_smoothing})")
        require(0 < self.pct_start < 1, f"--pct_start must be between 0 and 1 (got {self.pct_start})")
        require(self.div_factor > 0 and self.final_div_factor > 0,
                "--div_factor and --final_div_factor must be positive")
        require(self.max_tokens in (-1, 0) or self.max_tokens >= 16,
                f"--max_tokens must be -1 (auto), 0 or at least 16 (got {self.max_tokens})")
        require(self.batch_shape != "fixed" or (self.batching == "packed" and self.max_tokens != 0),
                "--batch_shape fixed needs --batching packed and a token budget (--max_tokens -1 or at least 16)")
        for path in self.data_files:
            require(path.endswith(DATA_FILE_TYPES),
                    f"--data_files takes {', '.join(DATA_FILE_TYPES)} files (got {path!r})")

    def with_autos_from(self, saved):
        """This config with each field left at auto taking its value in `saved` (a checkpoint's config dict)."""
        return dataclasses.replace(self, **{name: saved[name] for name, auto in AUTO_VALUES.items()
                                            if getattr(self, name) == auto and name in saved})

    @classmethod
    def from_args(cls, argv=None, prog=None):
        """Build a Config from `--field value` flags; bad flags or values exit with one line."""
        parser = OneLineParser(prog=prog, usage="%(prog)s [--field value ...]",
                               description="Every flag is a field of config.Config; edit its defaults there.")
        hints = typing.get_type_hints(cls)
        groups = {}
        for f in dataclasses.fields(cls):
            group = groups.get(f.metadata["group"]) or groups.setdefault(
                f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind, help_text = hints[f.name], f"{f.metadata['help']} (default: {default})"
            if kind is bool:
                group.add_argument(f"--{f.name}", type=_parse_bool, default=default, metavar="true|false",
                                   help=help_text)
            elif kind == list[str]:
                group.add_argument(f"--{f.name}", nargs="*", action="extend", default=default, metavar="FILE",
                                   help=help_text + "; repeating the flag adds files")
            else:
                group.add_argument(f"--{f.name}", type=kind, default=default, choices=f.metadata["choices"],
                                   help=help_text)
        config = cls(**vars(parser.parse_args(sys.argv[1:] if argv is None else argv)))
        try:
            config.validate()
        except ValueError as error:
            parser.error(str(error))
        return config


def _parse_bool(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage on error; we print the one line that says what to fix."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
