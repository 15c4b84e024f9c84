"""Sentence pairs in, token ids out: loading (hub or local files), the split, tokenizers, length filters.
Batching is batching.py's.

Knows nothing about the model. User mistakes (missing files, malformed lines, no usable pairs)
raise errors.RunError with one line that names the file and line; the scripts print it without a traceback.
"""
import dataclasses
import hashlib
import itertools
import json
import os
import random
import re
import time

import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from batching import TranslationDataset
from config import DATA_FILE_TYPES, LARGE_DATA_PAIRS, is_text, tokenizer_for
from errors import RunError

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, SOS, EOS]


# ---------------------------------------------------------------- loading

def load_pairs(cfg):
    """(source, target) string pairs from local files (each must hold some) or the hub, the count of unusable
    rows dropped, and how many of the pairs each file gave, in order (the hub: one count)."""
    if cfg.data_files:
        per_file = [read_pairs([path], cfg.lang_src, cfg.lang_tgt) for path in cfg.data_files]
        return ([pair for pairs, _ in per_file for pair in pairs], sum(dropped for _, dropped in per_file),
                [len(pairs) for pairs, _ in per_file])
    name = f"Helsinki-NLP/{cfg.dataset}"
    rows = ((f"{name} row {number}", row) for number, row in enumerate(_hub_rows(cfg.dataset, cfg.lang_src,
                                                                                 cfg.lang_tgt), 1))
    pairs, _, dropped = _usable_pairs(rows, cfg.lang_src, cfg.lang_tgt, name)
    return pairs, dropped, [len(pairs)]


def read_pairs(paths, src, tgt, strict=False):
    """(pairs, rows dropped) from local .jsonl (opus_books rows), .tsv (source<TAB>target) or .parquet files.
    strict: a row without a usable source and target stops with its file and line instead of being dropped,
    and the second item lists each pair's file and line instead (for messages about a pair)."""
    rows = (located for path in paths for located in _read_rows(path, src, tgt))
    pairs, wheres, dropped = _usable_pairs(rows, src, tgt, ", ".join(paths), strict)
    return pairs, wheres if strict else dropped


def _usable_pairs(rows, src, tgt, origin, strict=False):
    """rows: (where, row) with where naming the file and line (or the hub row) for error messages.
    Returns the pairs, where each came from, and the count of unusable rows dropped."""
    pairs, wheres, dropped = [], [], 0
    for where, row in rows:
        pair = _pair_from_row(row, src, tgt)
        if pair is not None and not all(map(is_text, pair)):
            raise RunError(f"{where}: holds a lone surrogate escape (such as \\ud800), which is not text; "
                           "fix or remove the line")
        if pair is None and strict:
            raise RunError(f"{where}: needs a non-empty {src!r} source and {tgt!r} reference")
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
            wheres.append(where)
    if not pairs:
        raise RunError(f"no usable {src}-{tgt} pairs in {origin} ({dropped} rows dropped)")
    return pairs, wheres, dropped


def _pair_from_row(row, src, tgt):
    """Rows follow the opus_books schema {"translation": {src: ..., tgt: ...}}; unusable rows give None."""
    translation = row.get("translation") if isinstance(row, dict) else None
    if not isinstance(translation, dict):
        return None
    source, target = translation.get(src), translation.get(tgt)
    if not (isinstance(source, str) and isinstance(target, str)):
        return None
    source, target = source.strip(), target.strip()
    return (source, target) if source and target else None


def check_data_file(path):
    """Refuse a path that names no data file of a kind read here (train.py asks before it touches its run
    directory)."""
    if not path.endswith(DATA_FILE_TYPES):
        raise RunError(f"{path}: expected a {', '.join(DATA_FILE_TYPES)} file (opus_books rows, or "
                       "source<TAB>target for .tsv)")
    if os.path.isdir(path):
        raise RunError(f"{path} is a directory; name the {', '.join(DATA_FILE_TYPES)} files in it")
    if not os.path.isfile(path):
        raise RunError(f"data file not found: {path}")


def _read_rows(path, src, tgt):
    check_data_file(path)
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    try:
        file = open(path, "rb")  # decoded line by line, so an encoding error names its line
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror}") from None
    with file:
        if path.endswith(".json") and file.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _json_array_rows(path, file)
            return
        file.seek(0)
        for number, raw in enumerate(file, 1):
            where = f"{path}:{number}"
            try:  # a UTF-8 byte-order mark is accepted, and so are Windows line endings
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise RunError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                               f"{error.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            if path.endswith(".tsv"):
                fields = line.split("\t")
                if len(fields) != 2:
                    raise RunError(f"{where}: expected source<TAB>target, found {len(fields)} fields")
                yield where, {"translation": {src: fields[0], tgt: fields[1]}}
            else:
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    raise RunError(f"{where}: malformed JSON ({error.msg})") from None
                except RecursionError:
                    raise RunError(f"{where}: malformed JSON (nested too deeply)") from None


def _json_array_rows(path, file):
    """A .json file holding one array of rows (what datasets' json loader also reads), rather than JSON lines."""
    file.seek(0)
    try:
        rows = json.loads(file.read().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise RunError(f"{path}: not UTF-8 (at byte {error.start}); convert the file to UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise RunError(f"{path}: malformed JSON ({getattr(error, 'msg', 'nested too deeply')}, line "
                       f"{getattr(error, 'lineno', '?')})") from None
    yield from ((f"{path} item {number}", row) for number, row in enumerate(rows, 1))


def _parquet_rows(path):
    """Rows of a Parquet file, read as it is now: the datasets library would serve a cached copy of a file
    replaced under the same path and modification time."""
    import pyarrow.parquet  # installed with datasets
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(f"{path}: not a readable Parquet file ({reason})") from None
    yield from ((f"{path} row {number}", row) for number, row in enumerate(rows, 1))


def _hub_rows(name, src, tgt):
    import datasets
    import huggingface_hub
    # Without a network the hub client retries for a while and logs every retry; the user gets one line instead.
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    config = "-".join(sorted((src, tgt)))  # opus_books names its configs alphabetically, e.g. "en-fr"
    try:
        return datasets.load_dataset(f"Helsinki-NLP/{name}", config, split="train")
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(f"could not load Helsinki-NLP/{name} ({config}) from the Hugging Face hub ({reason}); "
                       "to train offline pass local files, e.g. `python train.py --data_files "
                       "tests/fixtures/pairs.jsonl --epochs 2` (a sample this repository ships), or any .jsonl of "
                       '{"translation": {"en": ..., "fr": ...}} lines') from None


def split_pairs(pairs, val_fraction, seed, max_val_pairs=0):
    """Seeded split: the same pairs and seed always give the same train/validation sets. Validation takes
    val_fraction of the pairs, at most max_val_pairs of them (0: no cap)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * val_fraction))
    n_val = min(n_val, max_val_pairs) if max_val_pairs else n_val
    if n_val >= len(pairs):
        raise RunError(f"{len(pairs)} pairs are too few to split off a validation set; add data")
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# ---------------------------------------------------------------- tokenizers

def train_tokenizers(train_pairs, cfg):
    """Word mode: one WordLevel tokenizer per language. BPE mode: one joint tokenizer, returned twice."""
    sources = [source for source, _ in train_pairs]
    targets = [target for _, target in train_pairs]
    if tokenizer_for(cfg.tokenizer, len(train_pairs)) == "word":
        return (_train_word(sources, cfg.min_frequency, cfg.lowercase_source),
                _train_word(targets, cfg.min_frequency))
    tokenizer = Tokenizer(models.BPE())
    # Byte-level pieces cover every string and keep every space, so decoding restores the text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sources + targets, trainer)
    return tokenizer, tokenizer


def _train_word(texts, min_frequency, lowercase=False):
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    if lowercase:  # saved with the tokenizer, so translating folds case as training did
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_from_json(text):
    return Tokenizer.from_str(text)


def special_ids(tokenizer):
    return {name: tokenizer.token_to_id(token) for name, token in zip(("pad", "unk", "sos", "eos"), SPECIAL_TOKENS)}


def encode(tokenizer, texts):
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


# Word mode splits punctuation off words; these rules put French and English text back together.
_NO_SPACE_BEFORE = re.compile(r" ([,.)\]}…]|'|’|-)")
_NO_SPACE_AFTER = re.compile(r"([(\[{'’-]) ")


def decode(tokenizer, ids, word_level):
    """Token ids to one line of text: a line break the model emits (BPE keeps them) becomes a space, so that
    every input line gets exactly one output line. Word-level output is re-joined to read naturally."""
    if not word_level:
        return " ".join(tokenizer.decode(ids, skip_special_tokens=True).splitlines())
    text = " ".join(tokenizer.id_to_token(i) for i in ids if tokenizer.id_to_token(i) not in SPECIAL_TOKENS)
    return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


# ---------------------------------------------------------------- filtering

def length_filter(src_ids, tgt_ids, max_src_tokens, max_len_ratio, max_len_diff):
    """Indices of pairs kept by the length filters, measured in tokens (not characters): a source of at most
    max_src_tokens, a target of at most max_len_ratio x source + max_len_diff (the assignment's: ratio 1). A pair is
    kept whole or dropped, never cut."""
    return [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids))
            if len(s) <= max_src_tokens and len(t) <= max_len_ratio * len(s) + max_len_diff]


@dataclasses.dataclass
class Data:
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    ids: dict  # pad/unk/sos/eos ids, the same in both vocabularies
    train: TranslationDataset
    val: TranslationDataset
    val_pairs: list  # raw (source, reference) strings of the validation split
    fingerprint: str  # digest of every loaded pair, in order
    n_train_pairs: int  # the training split's size (before the length filters), which tokenizer=auto goes by
    eval_sets: dict = dataclasses.field(default_factory=dict)  # --eval_files: name -> (TranslationDataset, pairs)
    train_files: list = None  # the data file (its number in --data_files) of each training example
    eval_fingerprint: str = ""  # digest of every --eval_files set: its name and its pairs, in order


def prepare_data(cfg, tokenizers=None, log=print):
    """Load, split, tokenize and filter. Pass `tokenizers` (from a checkpoint) to skip training them."""
    seconds, started = {}, time.perf_counter()

    def lap(name):  # start-up is part of every run's wall time: each phase says what it costs
        nonlocal started
        seconds[name], started = time.perf_counter() - started, time.perf_counter()

    pairs, dropped, file_sizes = load_pairs(cfg)
    log(f"data: {len(pairs):,} pairs ({dropped:,} rows dropped: missing, empty or non-string side)")
    lap("load")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_pairs)
    train_pairs = without_validation_pairs(train_pairs, val_pairs, log)
    eval_pairs = read_eval_files(cfg)
    train_pairs = without_eval_sources(train_pairs, eval_pairs, log)
    lap("split")
    src_tokenizer, tgt_tokenizer = tokenizers or train_tokenizers(train_pairs, cfg)
    lap("tokenizers")
    ids = special_ids(tgt_tokenizer)

    def encode_pairs(pairs):
        return encode(src_tokenizer, [s for s, _ in pairs]), encode(tgt_tokenizer, [t for _, t in pairs])

    train_src, train_tgt = encode_pairs(train_pairs)
    check_vocabularies(cfg, (src_tokenizer, tgt_tokenizer), (train_src, train_tgt), ids["unk"], log)
    keep = length_filter(train_src, train_tgt, cfg.max_src_tokens, cfg.max_len_ratio, cfg.max_len_diff)
    lap("encoding")
    log(f"data: {len(keep):,} training pairs kept, {len(train_src) - len(keep):,} dropped by the length filters "
        f"(source > {cfg.max_src_tokens} tokens or target > {cfg.max_len_ratio:g} x source + {cfg.max_len_diff})")
    if not keep:
        raise RunError("the length filters left no training pairs; raise --max_src_tokens, --max_len_ratio or "
                       "--max_len_diff")

    def subset(src_ids, tgt_ids, indices):
        return TranslationDataset([src_ids[i] for i in indices], [tgt_ids[i] for i in indices], ids["sos"],
                                  ids["eos"])

    def fitting(held_out):  # the pairs the model can take whole, as a TranslationDataset, and their strings
        src_ids, tgt_ids = encode_pairs(held_out)
        fits = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if max(len(s), len(t)) < cfg.max_positions]
        return subset(src_ids, tgt_ids, fits), [held_out[i] for i in fits]

    val, fitting_val_pairs = fitting(val_pairs)
    if not len(val):
        raise RunError(f"none of the {len(val_pairs):,} validation pairs fits the model (--max_positions "
                       f"{cfg.max_positions} tokens); raise --max_positions or --val_fraction")
    kind = tokenizer_for(cfg.tokenizer, len(train_pairs))
    log(f"data: {len(val):,} validation pairs; vocabularies {src_tokenizer.get_vocab_size():,} ({cfg.lang_src}) / "
        f"{tgt_tokenizer.get_vocab_size():,} ({cfg.lang_tgt}), tokenizer={kind}"
        + (f" (auto: {len(train_pairs):,} training pairs, bpe from {LARGE_DATA_PAIRS:,})"
           if cfg.tokenizer == "auto" else ""))
    eval_sets = {name: fitting(held_out) for name, held_out in eval_pairs.items()}
    for name, (examples, _) in eval_sets.items():
        log(f"data: evaluation set {name}: {len(examples):,} pairs"
            + (f" ({len(eval_pairs[name]) - len(examples):,} longer than the model takes left out)"
               if len(examples) < len(eval_pairs[name]) else ""))
    source_file = {}  # the file each pair came from (the first, for a pair in two)
    for number, (start, size) in enumerate(zip(itertools.accumulate([0] + file_sizes), file_sizes)):
        for pair in pairs[start:start + size]:
            source_file.setdefault(pair, number)
    data = Data(src_tokenizer, tgt_tokenizer, ids, subset(train_src, train_tgt, keep), val, fitting_val_pairs,
                fingerprint(pairs), len(train_pairs), eval_sets, [source_file[train_pairs[i]] for i in keep],
                fingerprint([(name, fingerprint(held_out)) for name, held_out in eval_pairs.items()]))
    lap("validation")
    log(f"data: ready in {sum(seconds.values()):.1f} s ("
        + ", ".join(f"{name} {value:.1f}" for name, value in seconds.items()) + ")")
    return data


def prepare_shared_data(cfg, tokenizers, is_main, world_size, log):
    """prepare_data in every process: rank 0 trains the tokenizers (unless given a checkpoint's), the others
    receive them, so that every rank encodes with the very same."""
    if tokenizers or is_main:
        data = prepare_data(cfg, tokenizers, log)
    if world_size > 1 and not tokenizers:
        shared = [[data.src_tokenizer.to_str(), data.tgt_tokenizer.to_str()] if is_main else None]
        dist.broadcast_object_list(shared)
        if not is_main:
            data = prepare_data(cfg, [tokenizer_from_json(text) for text in shared[0]], log)
    return data


def fingerprint(pairs):
    """A digest of the pairs' text: a resumed run checks that its data is still what it trained on."""
    return hashlib.sha256("".join(f"{source}\t{target}\n" for source, target in pairs).encode()).hexdigest()


def without_validation_pairs(train_pairs, val_pairs, log):
    """Training pairs that repeat a validation pair (duplicates in a corpus, or a file passed twice) would make
    validation score sentences the model trained on: they are left out of training, and counted."""
    val_set = set(val_pairs)
    return _left_out(train_pairs, lambda pair: pair in val_set, log,
                     "warning: {:,} training pairs repeat a validation pair (duplicates in the data, or a file "
                     "passed twice); they were left out of training",
                     "every training pair repeats a validation pair; the data holds too few distinct pairs")


def read_eval_files(cfg):
    """--eval_files as {name: pairs}, each named by its file (a number added where two names would clash)."""
    sets = {}
    for path in cfg.eval_files:
        name = base = os.path.splitext(os.path.basename(path))[0]
        for number in itertools.count(2):
            if name not in sets:
                break
            name = f"{base}_{number}"
        sets[name] = read_pairs([path], cfg.lang_src, cfg.lang_tgt)[0]
    return sets


def without_eval_sources(train_pairs, eval_pairs, log):
    """Training pairs whose source sentence is one of an evaluation set's would score text the model trained on:
    they are left out of training, and counted."""
    sources = {source for pairs in eval_pairs.values() for source, _ in pairs}
    return _left_out(train_pairs, lambda pair: pair[0] in sources, log,
                     "data: {:,} training pairs have the source of an --eval_files pair; they were left out of "
                     "training",
                     "every training pair has the source of an --eval_files pair; evaluate on other files")


def _left_out(train_pairs, held_out, log, counted, refused):
    """The training pairs for which held_out(pair) is false; logs `counted` with how many were left out, and
    refuses with `refused` when none is left."""
    kept = [pair for pair in train_pairs if not held_out(pair)]
    if len(kept) < len(train_pairs):
        log(counted.format(len(train_pairs) - len(kept)))
    if not kept:
        raise RunError(refused)
    return kept


def check_vocabularies(cfg, tokenizers, encoded, unk_id, log):
    """Refuse a vocabulary of special tokens only (every word would be [UNK], and translations empty while the
    loss looks fine), and warn when unknown words are a large share of the training text."""
    for language, tokenizer, ids in zip((cfg.lang_src, cfg.lang_tgt), tokenizers, encoded):
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise RunError(f"the {language} vocabulary holds only the special tokens: no word occurs "
                           f"--min_frequency {cfg.min_frequency} times in the training split; lower --min_frequency")
        tokens = sum(len(sentence) for sentence in ids)
        unknown = sum(sentence.count(unk_id) for sentence in ids)
        if unknown > 0.5 * tokens:
            log(f"warning: {unknown / tokens:.0%} of the {language} training tokens are unknown words ([UNK]); "
                "lower --min_frequency or use --tokenizer bpe")
