"""Every hyperparameter in one dataclass. Edit the defaults here or pass `--field value` flags."""
import argparse
import dataclasses
import inspect
import math
import re
import sys
import typing
from dataclasses import dataclass, field

SHARE_LAYOUTS = ("none", "sequence", "cycle", "cycle_rev")
TOKENIZERS = ("word", "bpe")
AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cuda", "cpu")
BATCHINGS = ("packed", "bucketed", "random")
BATCH_SHAPES = ("auto", "fixed", "varied")
ANNEAL_STRATEGIES = ("cos", "linear")
# Fields whose default means "auto". A resumed run takes the values its checkpoint was trained with, so batches
# and schedule stay the same; a new run resolves them for its device (runtime.resolve_autos; epochs: train.py).
AUTO_VALUES = {"epochs": 0, "max_tokens": -1, "batch_shape": "auto", "lr": 0.0, "dropout": -1.0}
# The fields that describe the model's architecture: a checkpoint's config rebuilds its model from them.
MODEL_FIELDS = ("d_model", "n_heads", "d_ff", "n_layers", "n_decoder_layers", "n_unique_layers", "share",
                "tie_embeddings", "dropout", "attn_dropout", "max_positions")


@dataclass
class Config:
    # data
    dataset: str = "opus_books"  # Hugging Face dataset (Helsinki-NLP/<name>); ignored when data_files is set
    lang_src: str = "en"  # source language key in the rows' "translation" dict
    lang_tgt: str = "fr"  # target language key in the rows' "translation" dict
    data_files: list[str] = field(default_factory=list)  # local .jsonl/.tsv/.parquet files; empty = the hub dataset
    val_fraction: float = 0.03  # share of pairs held out for validation (seeded, stable split)
    max_src_tokens: int = 150  # drop training pairs whose source has more tokens than this
    max_len_diff: int = 10  # drop training pairs whose target is longer than source + this (in tokens)
    max_positions: int = 1024  # longest sequence the model accepts (sinusoidal table size)
    tokenizer: str = "word"  # word: one word-level vocabulary per language; bpe: one joint subword vocabulary
    vocab_size: int = 16000  # joint vocabulary size for tokenizer=bpe
    min_frequency: int = 2  # a word needs this many occurrences to enter a word-level vocabulary
    lowercase_source: bool = True  # word tokenizer: fold the source's case ("Forget it!" reads as "forget it!")
    # model
    d_model: int = 512  # width of embeddings and residual stream
    n_heads: int = 8  # attention heads; must divide d_model
    d_ff: int = 128  # hidden width of the feed-forward sublayer
    n_layers: int = 6  # layers in the encoder (and in the decoder, unless n_decoder_layers says otherwise)
    n_decoder_layers: int = 1  # layers in the decoder (0 = n_layers): a shallow one decodes and trains faster
    n_unique_layers: int = 3  # distinct blocks each stack's layers are drawn from (ignored when share=none)
    share: str = "cycle_rev"  # cross-layer sharing: none, sequence, cycle, cycle_rev (Takase & Kiyono 2021)
    tie_embeddings: bool = False  # one matrix for source, target and output embeddings (needs tokenizer=bpe)
    dropout: float = -1.0  # dropout on embeddings, residual branches and FF hidden layer (-1 = auto: CUDA 0.1, CPU 0)
    attn_dropout: float = 0.0  # dropout on attention weights (> 0 keeps SDPA off its fused CPU kernel)
    # optimisation
    epochs: int = 0  # passes over the training split (0 = auto: 10, or no limit when max_minutes is set)
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    max_minutes: float = 0.0  # training-time budget: the schedule is sized to end on time (0 = off)
    batch_size: int = 32  # sentences per batch when max_tokens = 0
    accum_steps: int = 1  # batches per optimizer step (gradient accumulation; 1 = none)
    max_tokens: int = -1  # source + target tokens per batch (0 = batch_size sentences; -1 = auto: CPU 0, CUDA 16384)
    batching: str = "packed"  # packed (random batches packed into rows), bucketed (similar lengths) or random
    batch_shape: str = "auto"  # packed rows: fixed (one shape for CUDA graphs) or varied (auto: fixed on CUDA)
    pack_length: int = 64  # packed: tokens a side per row, or its longest sentence (wider: less pad, more attention)
    bucket_pool: int = 1000  # bucketed: batches' worth of shuffled examples sorted together (smaller = more random)
    pad_multiple: int = 0  # pad batch widths to a multiple of this (0 = auto: 8 on CUDA or packed, else 1)
    lr: float = 0.0  # OneCycle peak learning rate (0 = auto: 5e-4, x sqrt(max_tokens / 2048) above 2048 tokens)
    weight_decay: float = 0.01  # AdamW weight decay
    pct_start: float = 0.1  # share of steps spent warming up to the peak lr
    three_phase: bool = False  # OneCycle: also anneal back to the initial lr before the final decay (reference)
    anneal_strategy: str = "cos"  # OneCycle annealing: cos or linear (reference: linear)
    div_factor: float = 10.0  # initial lr = lr / div_factor
    final_div_factor: float = 10.0  # final lr = initial lr / final_div_factor
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy loss
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    ema_decay: float = 0.998  # evaluate and save this moving average of the weights (0 = off: the trained ones)
    nan_patience: int = 3  # stop after this many consecutive steps with a non-finite loss
    # system
    amp: str = "auto"  # auto (CUDA: bf16, else fp16; CPU: bf16 where measured faster than fp32), fp16, bf16, off
    compile: bool = False  # torch.compile the model for training
    cuda_graph: bool = True  # replay each step as one CUDA graph (fixed batch_shape, bf16/fp32, one process)
    device: str = "auto"  # auto (cuda if available), cuda or cpu
    seed: int = 42  # seeds the split, the batches, initialisation and dropout
    num_workers: int = -1  # DataLoader worker processes (-1 = auto: 2 on CUDA, 0 on a CPU, whose cores train)
    run_dir: str = "runs/opus_books"  # where checkpoints, metrics and TensorBoard logs go
    resume: str = ""  # "" = fresh run, "auto" = run_dir/last.pt if it exists, or a checkpoint path
    log_every: int = 50  # steps between progress-bar and TensorBoard updates
    # evaluation
    eval_every_minutes: float = 0.0  # evaluate and save at an epoch end after this much training (0 = auto, README)
    n_eval_sentences: int = 500  # validation sentences translated per evaluation: BLEU/chrF/CER/WER; BLEU picks best.pt
    beam: int = 1  # beam size for evaluation translations (1 = greedy)
    length_penalty: float = 0.6  # GNMT length-penalty alpha for beam search
    max_len_a: float = 1.2  # a translation has at most max_len_a * source tokens + max_len_b tokens
    max_len_b: int = 10  # see max_len_a

    def validate(self):
        """Raise ValueError with a one-line message naming the flag to change."""
        def require(ok, message):
            if not ok:
                raise ValueError(message)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(not isinstance(value, float) or math.isfinite(value), f"--{f.name} must be a finite number "
                                                                            f"(got {value})")
        require(self.share in SHARE_LAYOUTS, f"--share must be one of {', '.join(SHARE_LAYOUTS)} (got {self.share!r})")
        require(self.tokenizer in TOKENIZERS,
                f"--tokenizer must be one of {', '.join(TOKENIZERS)} (got {self.tokenizer!r})")
        require(self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)} (got {self.amp!r})")
        require(self.anneal_strategy in ANNEAL_STRATEGIES,
                f"--anneal_strategy must be one of {', '.join(ANNEAL_STRATEGIES)} (got {self.anneal_strategy!r})")
        require(self.batching in BATCHINGS,
                f"--batching must be one of {', '.join(BATCHINGS)} (got {self.batching!r})")
        require(self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)} (got {self.device!r})")
        require(self.lang_src != self.lang_tgt, f"--lang_src and --lang_tgt must differ (both {self.lang_src!r})")
        for name in ("d_model", "n_heads", "d_ff", "n_layers", "n_unique_layers", "batch_size",
                     "max_src_tokens", "max_positions", "vocab_size", "min_frequency", "pack_length", "accum_steps",
                     "bucket_pool", "nan_patience", "log_every", "beam"):
            require(getattr(self, name) >= 1, f"--{name} must be at least 1 (got {getattr(self, name)})")
        require(self.num_workers >= -1, f"--num_workers must be -1 (auto) or more (got {self.num_workers})")
        for name in ("n_decoder_layers", "epochs", "max_steps", "max_minutes", "eval_every_minutes", "lr",
                     "max_len_diff", "n_eval_sentences", "grad_clip", "ema_decay", "attn_dropout",
                     "weight_decay", "label_smoothing", "length_penalty", "max_len_a", "max_len_b", "pad_multiple"):
            require(getattr(self, name) >= 0, f"--{name} must not be negative (got {getattr(self, name)})")
        require(self.d_model % self.n_heads == 0,
                f"n_heads must divide d_model (got {self.d_model} and {self.n_heads})")
        require(self.max_src_tokens + self.max_len_diff < self.max_positions,
                f"--max_positions must exceed --max_src_tokens + --max_len_diff, the longest training target "
                f"(got {self.max_positions} <= {self.max_src_tokens} + {self.max_len_diff})")
        require(self.n_unique_layers <= self.n_layers,
                f"--n_unique_layers must not exceed --n_layers (got {self.n_unique_layers} > {self.n_layers})")
        require(not (self.tie_embeddings and self.tokenizer != "bpe"),
                "--tie_embeddings true needs --tokenizer bpe (word mode has two vocabularies)")
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
        require(self.batch_shape in BATCH_SHAPES,
                f"--batch_shape must be one of {', '.join(BATCH_SHAPES)} (got {self.batch_shape!r})")
        require(self.batch_shape != "fixed" or (self.batching == "packed" and self.max_tokens != 0),
                "--batch_shape fixed needs --batching packed and a token budget (--max_tokens -1 or at least 16)")
        for path in self.data_files:
            require(path.endswith((".jsonl", ".json", ".tsv", ".parquet")),
                    f"--data_files takes .jsonl, .tsv or .parquet files (got {path!r})")

    def with_autos_from(self, saved):
        """This config with each field left at auto taking its value in `saved` (a checkpoint's config dict)."""
        return dataclasses.replace(self, **{name: saved[name] for name, auto in AUTO_VALUES.items()
                                            if getattr(self, name) == auto and name in saved})

    @classmethod
    def from_args(cls, argv=None, prog=None):
        """Build a Config from `--field value` flags; bad flags or values exit with one line."""
        parser = OneLineParser(prog=prog, description="Every flag is a field of config.Config.")
        hints = typing.get_type_hints(cls)
        # --help shows the one-line comment each field carries in this file
        comments = dict(re.findall(r"^    (\w+): .*?  # (.+)$", inspect.getsource(cls), re.MULTILINE))
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            kind, help_text = hints[f.name], f"{comments.get(f.name, '')} (default: {default})"
            if kind is bool:
                parser.add_argument(f"--{f.name}", type=_parse_bool, default=default, metavar="true|false",
                                    help=help_text)
            elif kind == list[str]:
                parser.add_argument(f"--{f.name}", nargs="*", default=default, metavar="FILE", help=help_text)
            else:
                parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
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
