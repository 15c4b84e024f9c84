"""Sentence pairs in, token ids out: the split, tokenizers, length filters, and the prepared-data cache that
keeps the result memory-mapped for every later run. Reading the pairs is reading.py's, batching batching.py's.

Knows nothing about the model. User mistakes (missing files, malformed lines, no usable pairs)
raise errors.RunError with one line that names the file and line; the scripts print it without a traceback.
"""
import concurrent.futures
import dataclasses
import hashlib
import itertools
import os
import random
import re
import time

import numpy as np
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import config
import datacache
from batching import TranslationDataset
from config import LARGE_DATA_PAIRS, tokenizer_for
from errors import RunError
from reading import check_data_file, data_file_paths, hub_rows, load_pairs, read_eval_files, read_pairs, stream_pairs

__all__ = ["check_data_file", "data_file_paths", "load_pairs", "read_pairs"]  # the scripts read them through dataset

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, SOS, EOS]


def split_pairs(pairs, val_fraction, seed, max_val_pairs=0):
    """Seeded split: the same pairs and seed always give the same train/validation sets. Validation takes
    val_fraction of the pairs, at most max_val_pairs of them (0: no cap)."""
    train, val = split_order(len(pairs), val_fraction, seed, max_val_pairs)
    return [pairs[i] for i in train], [pairs[i] for i in val]


def split_order(n_pairs, val_fraction, seed, max_val_pairs=0):
    """The positions of split_pairs' training and validation pairs, in their order."""
    order = list(range(n_pairs))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n_pairs * val_fraction))
    n_val = min(n_val, max_val_pairs) if max_val_pairs else n_val
    if n_val >= n_pairs:
        raise RunError(f"{n_pairs} pairs are too few to split off a validation set; add data")
    return order[n_val:], order[:n_val]


# ---------------------------------------------------------------- tokenizers

def tokenizer_sample(n_train_pairs, cfg):
    """Which training pairs the tokenizers learn from: all of them, or on a large corpus a seeded sample of
    --tokenizer_sample_pairs (as SentencePiece's input_sentence_size), in the split's order."""
    if not cfg.tokenizer_sample_pairs or n_train_pairs <= cfg.tokenizer_sample_pairs:
        return range(n_train_pairs)
    return sorted(random.Random(cfg.seed).sample(range(n_train_pairs), cfg.tokenizer_sample_pairs))


def train_tokenizers(train_pairs, cfg, n_train_pairs=None):
    """Word mode: one WordLevel tokenizer per language. BPE mode: one joint tokenizer, returned twice.
    n_train_pairs: the training split's size, where train_pairs are a sample of it (tokenizer=auto goes by it)."""
    sources = [source for source, _ in train_pairs]
    targets = [target for _, target in train_pairs]
    if tokenizer_for(cfg.tokenizer, n_train_pairs or len(train_pairs)) == "word":
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
    train_files: object = None  # the data file (its number in --data_files) of each training example
    eval_fingerprint: str = ""  # digest of every --eval_files set: its name and its pairs, in order


class Laps:
    """Start-up is part of every run's wall time: each phase of preparing the data says what it costs."""

    def __init__(self):
        self.seconds, self.started = {}, time.perf_counter()

    def __call__(self, name):
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.started
        self.started = time.perf_counter()

    def __str__(self):
        return (f"{sum(self.seconds.values()):.1f} s ("
                + ", ".join(f"{name} {value:.1f}" for name, value in self.seconds.items()) + ")")


def prepare_data(cfg, tokenizers=None, log=print):
    """Load, split, tokenize and filter: into the memory-mapped cache (--data_cache), prepared once for all later
    runs, or in memory (--data_cache off). Pass `tokenizers` (from a checkpoint) to skip training them."""
    if cfg.data_cache != "off":
        return prepare_cached(cfg, tokenizers, log)
    laps = Laps()
    pairs, dropped, file_sizes = load_pairs(cfg)
    log(f"data: {len(pairs):,} pairs ({dropped:,} rows dropped: missing, empty or non-string side)")
    laps("load")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed, cfg.max_val_pairs)
    train_pairs = without_validation_pairs(train_pairs, val_pairs, log)
    eval_pairs = read_eval_files(cfg)
    train_pairs = without_eval_sources(train_pairs, eval_pairs, log)
    laps("split")
    tokenizers = tokenizers or train_tokenizers([train_pairs[i] for i in tokenizer_sample(len(train_pairs), cfg)],
                                                cfg, len(train_pairs))
    laps("tokenizers")
    train_src, train_tgt = encode(tokenizers[0], [s for s, _ in train_pairs]), encode(tokenizers[1], [t for _, t in train_pairs])
    unk = special_ids(tokenizers[1])["unk"]
    check_vocabularies(cfg, tokenizers, [(sum(map(len, side)), sum(ids.count(unk) for ids in side))
                                         for side in (train_src, train_tgt)], log)
    keep = length_filter(train_src, train_tgt, cfg.max_src_tokens, cfg.max_len_ratio, cfg.max_len_diff)
    log_length_filters(cfg, len(keep), len(train_src), log)
    laps("encoding")
    source_file = {}  # the file each pair came from (the first, for a pair in two)
    for number, (start, size) in enumerate(zip(itertools.accumulate([0] + file_sizes), file_sizes)):
        for pair in pairs[start:start + size]:
            source_file.setdefault(pair, number)
    ids = special_ids(tokenizers[1])
    train = TranslationDataset([train_src[i] for i in keep], [train_tgt[i] for i in keep], ids["sos"], ids["eos"])
    data = finish(cfg, tokenizers, train, [source_file[train_pairs[i]] for i in keep], val_pairs, eval_pairs,
                  len(train_pairs), fingerprint(pairs), laps, log)
    log(f"data: ready in {laps}")
    return data


def finish(cfg, tokenizers, train, train_files, val_pairs, eval_pairs, n_train_pairs, data_fingerprint, laps, log):
    """The Data of a prepared training split: the validation and --eval_files sets encoded (the pairs the model
    takes whole), their sizes and the vocabularies logged."""
    ids = special_ids(tokenizers[1])

    def fitting(held_out):  # the pairs the model can take whole, as a TranslationDataset, and their strings
        src_ids, tgt_ids = encode(tokenizers[0], [s for s, _ in held_out]), encode(tokenizers[1], [t for _, t in held_out])
        fits = [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids)) if max(len(s), len(t)) < cfg.max_positions]
        return (TranslationDataset([src_ids[i] for i in fits], [tgt_ids[i] for i in fits], ids["sos"], ids["eos"]),
                [held_out[i] for i in fits])

    val, fitting_val_pairs = fitting(val_pairs)
    if not len(val):
        raise RunError(f"none of the {len(val_pairs):,} validation pairs fits the model (--max_positions "
                       f"{cfg.max_positions} tokens); raise --max_positions or --val_fraction")
    log(f"data: {len(val):,} validation pairs; vocabularies {tokenizers[0].get_vocab_size():,} ({cfg.lang_src}) / "
        f"{tokenizers[1].get_vocab_size():,} ({cfg.lang_tgt}), tokenizer={tokenizer_for(cfg.tokenizer, n_train_pairs)}"
        + (f" (auto: {n_train_pairs:,} training pairs, bpe from {LARGE_DATA_PAIRS:,})"
           if cfg.tokenizer == "auto" else ""))
    eval_sets = {name: fitting(held_out) for name, held_out in eval_pairs.items()}
    for name, (examples, _) in eval_sets.items():
        log(f"data: evaluation set {name}: {len(examples):,} pairs"
            + (f" ({len(eval_pairs[name]) - len(examples):,} longer than the model takes left out)"
               if len(examples) < len(eval_pairs[name]) else ""))
    laps("validation")
    return Data(*tokenizers, ids, train, val, fitting_val_pairs, data_fingerprint, n_train_pairs, eval_sets,
                train_files, fingerprint([(name, fingerprint(held_out)) for name, held_out in eval_pairs.items()]))


def log_length_filters(cfg, kept, total, log):
    log(f"data: {kept:,} training pairs kept, {total - kept:,} dropped by the length filters "
        f"(source > {cfg.max_src_tokens} tokens or target > {cfg.max_len_ratio:g} x source + {cfg.max_len_diff})")
    if not kept:
        raise RunError("the length filters left no training pairs; raise --max_src_tokens, --max_len_ratio or "
                       "--max_len_diff")


def prepare_shared_data(cfg, tokenizers, is_main, world_size, log):
    """prepare_data in every process: rank 0 first (it trains the tokenizers, unless given a checkpoint's), then
    the others, given rank 0's tokenizers so that every rank encodes with the very same. Through the cache they
    map the entry rank 0 prepared."""
    if world_size == 1:
        return prepare_data(cfg, tokenizers, log)
    data = prepare_data(cfg, tokenizers, log) if is_main else None
    shared = [[data.src_tokenizer.to_str(), data.tgt_tokenizer.to_str()] if is_main else None]
    dist.broadcast_object_list(shared)  # the other ranks wait here while rank 0 prepares
    return data or prepare_data(cfg, [tokenizer_from_json(text) for text in shared[0]], log)


def fingerprint(pairs):
    """A digest of the pairs' text: a resumed run checks that its data is still what it trained on."""
    return hashlib.sha256("".join(f"{source}\t{target}\n" for source, target in pairs).encode()).hexdigest()


def without_validation_pairs(train_pairs, val_pairs, log):
    """Training pairs that repeat a validation pair (duplicates in a corpus, or a file passed twice) would make
    validation score sentences the model trained on: they are left out of training, and counted."""
    val_set = set(val_pairs)
    return _left_out(train_pairs, lambda pair: pair in val_set, log, VALIDATION_REPEATS, ALL_REPEAT_VALIDATION)


VALIDATION_REPEATS = ("warning: {:,} training pairs repeat a validation pair (duplicates in the data, or a file "
                      "passed twice); they were left out of training")
ALL_REPEAT_VALIDATION = "every training pair repeats a validation pair; the data holds too few distinct pairs"
EVAL_SOURCES = "data: {:,} training pairs have the source of an --eval_files pair; they were left out of training"
ALL_EVAL_SOURCES = "every training pair has the source of an --eval_files pair; evaluate on other files"


def without_eval_sources(train_pairs, eval_pairs, log):
    """Training pairs whose source sentence is one of an evaluation set's would score text the model trained on:
    they are left out of training, and counted."""
    sources = {source for pairs in eval_pairs.values() for source, _ in pairs}
    return _left_out(train_pairs, lambda pair: pair[0] in sources, log, EVAL_SOURCES, ALL_EVAL_SOURCES)


def _left_out(train_pairs, held_out, log, counted, refused):
    """The training pairs for which held_out(pair) is false; logs `counted` with how many were left out, and
    refuses with `refused` when none is left."""
    kept = [pair for pair in train_pairs if not held_out(pair)]
    if len(kept) < len(train_pairs):
        log(counted.format(len(train_pairs) - len(kept)))
    if not kept:
        raise RunError(refused)
    return kept


def check_vocabularies(cfg, tokenizers, tallies, log):
    """Refuse a vocabulary of special tokens only (every word would be [UNK], and translations empty while the
    loss looks fine), and warn when unknown words are a large share of the training text. tallies: per
    language, the training split's (tokens, unknown tokens)."""
    for language, tokenizer, (tokens, unknown) in zip((cfg.lang_src, cfg.lang_tgt), tokenizers, tallies):
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise RunError(f"the {language} vocabulary holds only the special tokens: no word occurs "
                           f"--min_frequency {cfg.min_frequency} times in the training split; lower --min_frequency")
        if unknown > 0.5 * tokens:
            log(f"warning: {unknown / tokens:.0%} of the {language} training tokens are unknown words ([UNK]); "
                "lower --min_frequency or use --tokenizer bpe")


# ---------------------------------------------------------------- the prepared-data cache

# Settings that shape the prepared ids (with the data's content, they make the cache's key).
KEY_FIELDS = ("lang_src", "lang_tgt", "val_fraction", "max_val_pairs", "seed", "tokenizer", "vocab_size",
              "min_frequency", "lowercase_source", "max_src_tokens", "max_len_ratio", "max_len_diff",
              "tokenizer_sample_pairs")
CHUNK_PAIRS = 50_000  # encoded at a time: large enough for encode_batch to use every core


def cache_key_parts(cfg):
    if cfg.data_files:
        content = [datacache.file_digest(path) for path in data_file_paths(cfg.data_files)]
    else:  # the datasets library's own digest of the dataset's files
        content = [f"Helsinki-NLP/{cfg.dataset}", hub_rows(cfg.dataset, cfg.lang_src, cfg.lang_tgt)._fingerprint]
    return {"data": content, "eval_files": [datacache.file_digest(path) for path in cfg.eval_files],
            "auto_bpe_from": config.LARGE_DATA_PAIRS, **{name: getattr(cfg, name) for name in KEY_FIELDS}}


def prepare_cached(cfg, tokenizers, log):
    """prepare_data through the cache: the entry of this data and these settings is mapped if it is there, and
    prepared into it (streaming: memory holds a chunk of pairs, not the corpus) if not. Given tokenizers use
    the entry prepared with them: the one the settings name when they are its, else one keyed by them too."""
    laps, root = Laps(), datacache.cache_root(cfg.data_cache)
    parts = cache_key_parts(cfg)
    given = [tokenizer.to_str() for tokenizer in tokenizers] if tokenizers else None
    keys = [datacache.key_of(parts)]
    if given:  # a resumed config holds --tokenizer auto's choice: the entry may be under auto
        keys += [datacache.key_of({**parts, "tokenizer": "auto"}), datacache.key_of({**parts, "tokenizers": given})]
    laps("key")
    for key in keys:
        with datacache.locked(root, key, log):
            entry = datacache.open_entry(root, key, log)
            if entry and given not in (None, entry[0]["tokenizers"]):
                continue
            if entry is None and key != keys[-1] and given:
                continue
            prepared = entry is None
            if prepared:
                stage = datacache.Staging(root, key)
                try:
                    stage.publish(prepare_into(stage, cfg, tokenizers, laps, log))
                except BaseException:  # Ctrl-C included: no half-written entry is ever marked complete
                    stage.discard()
                    raise
                entry = datacache.open_entry(root, key, log)
            else:
                for line in entry[0]["log"]:
                    log(line)
            laps("mapping")
            description, arrays = entry
            tokenizers = [tokenizer_from_json(text) for text in description["tokenizers"]]
            train = TranslationDataset.from_arrays(*(arrays[name] for name in (
                "src_tokens", "tgt_tokens", "src_starts", "src_lengths", "tgt_starts", "tgt_lengths")))
            data = finish(cfg, tokenizers, train, arrays["train_files"], [tuple(pair) for pair in description["val_pairs"]],
                          read_eval_files(cfg), description["n_train_pairs"], description["fingerprint"], laps, log)
            log(f"data: ready in {laps}; {'prepared into' if prepared else 'mapped from'} "
                f"{os.path.join(root, key)}")
            return data


def prepare_into(stage, cfg, tokenizers, laps, log):
    """Prepare the data into a staging entry: read once (the text kept as scratch arrays), split, tokenizers
    trained on a sample, encoded a chunk at a time in file order, then indexed in the split's order. Returns the
    entry's description. The ids equal prepare_data's in memory, id for id."""
    said = []

    def say(line):  # the lines a later run that maps the entry says again
        said.append(line)
        log(line)

    digest, counts, columns = hashlib.sha256(), [], {"pair_hashes": [], "source_hashes": [], "files": []}
    chunk = {"src": [], "tgt": [], "pair_hashes": [], "source_hashes": [], "files": []}

    def write_chunk():  # the text as scratch arrays; hashes and file numbers in memory, 8 bytes a pair
        for side in ("src", "tgt"):
            encoded = [text.encode() for text in chunk[side]]
            stage.append(f"{side}_text", np.frombuffer(b"".join(encoded), dtype=np.uint8), np.uint8)
            stage.append(f"{side}_text_lengths", [len(item) for item in encoded], np.int32)
        for name, values in columns.items():
            values.append(np.array(chunk[name], dtype=np.int64))
        for values in chunk.values():
            values.clear()

    for number, (source, target) in stream_pairs(cfg, counts):
        digest.update(f"{source}\t{target}\n".encode())
        for name, value in (("src", source), ("tgt", target), ("pair_hashes", hash((source, target))),
                            ("source_hashes", hash(source)), ("files", number)):
            chunk[name].append(value)
        if len(chunk["files"]) == CHUNK_PAIRS:
            write_chunk()
    write_chunk()
    pair_hashes, source_hashes, files = (np.concatenate(columns[name]) for name in columns)
    n_pairs = len(files)
    say(f"data: {n_pairs:,} pairs ({sum(dropped for _, dropped in counts):,} rows dropped: missing, empty or "
        "non-string side)")
    laps("load")
    texts = {side: (stage.read_bytes(f"{side}_text"),
                    np.concatenate([[0], np.cumsum(stage.read(f"{side}_text_lengths"), dtype=np.int64)]))
             for side in ("src", "tgt")}

    def text(side, position):
        raw, offsets = texts[side]
        return raw[offsets[position]:offsets[position + 1]].decode()

    def pair(position):
        return text("src", position), text("tgt", position)

    train_positions, val_positions = split_order(n_pairs, cfg.val_fraction, cfg.seed, cfg.max_val_pairs)
    val_pairs = [pair(position) for position in val_positions]
    eval_pairs = read_eval_files(cfg)
    train_positions = np.array(train_positions, dtype=np.int64)
    for held_out, hashes, is_held_out, counted, refused in (
            (val_pairs, pair_hashes, set(val_pairs).__contains__, VALIDATION_REPEATS, ALL_REPEAT_VALIDATION),
            ([source for pairs in eval_pairs.values() for source, _ in pairs], source_hashes,
             {source for pairs in eval_pairs.values() for source, _ in pairs}.__contains__, EVAL_SOURCES,
             ALL_EVAL_SOURCES)):
        # hashes find the candidates; the text decides
        candidates = np.isin(hashes[train_positions], [hash(item) for item in held_out])
        out = [i for i in np.flatnonzero(candidates).tolist()
               if is_held_out(pair(train_positions[i]) if hashes is pair_hashes else text("src", train_positions[i]))]
        train_positions = _left_out_positions(train_positions, out, say, counted, refused)
    n_train = len(train_positions)
    laps("split")
    if not tokenizers:
        tokenizers = train_tokenizers([pair(train_positions[i]) for i in tokenizer_sample(n_train, cfg)], cfg, n_train)
    laps("tokenizers")
    ids = special_ids(tokenizers[1])
    token_type = np.uint16 if max(t.get_vocab_size() for t in tokenizers) <= 2 ** 16 else np.int32
    tallies = np.zeros((2, 2), dtype=np.int64)  # per side: tokens, unknown tokens
    kept_positions, kept_lengths = [], []

    def store_chunk(positions, sides):  # the pairs the length filters keep, as the in-memory TranslationDataset has them
        lengths = [np.fromiter(map(len, side), dtype=np.int64, count=len(side)) for side in sides]
        flats = [np.fromiter(itertools.chain.from_iterable(side), dtype=np.int64, count=int(length.sum()))
                 for side, length in zip(sides, lengths)]
        for row, flat in enumerate(flats):
            tallies[row] += len(flat), np.count_nonzero(flat == ids["unk"])
        keep = (lengths[0] <= cfg.max_src_tokens) & (lengths[1] <= cfg.max_len_ratio * lengths[0] + cfg.max_len_diff)
        for name, flat, length, before in (("src_tokens", flats[0], lengths[0], []),
                                           ("tgt_tokens", flats[1], lengths[1], [ids["sos"]])):
            stage.append(name, with_specials(flat[np.repeat(keep, length)], length[keep], before, ids["eos"]),
                         token_type)
        kept_positions.append(positions[keep])
        kept_lengths.append(np.stack([lengths[0][keep] + 1, lengths[1][keep] + 1]))

    in_file_order = np.sort(train_positions)  # so that reading the text stays sequential
    chunks = [in_file_order[start:start + CHUNK_PAIRS] for start in range(0, n_train, CHUNK_PAIRS)]

    def encoded(positions):  # encode_batch lets go of the GIL: the next chunk encodes while this one is stored
        return [encode(tokenizer, [text(side, p) for p in positions.tolist()])
                for tokenizer, side in zip(tokenizers, ("src", "tgt"))]

    with concurrent.futures.ThreadPoolExecutor(1) as encoder:
        pending = [encoder.submit(encoded, positions) for positions in chunks[:2]]
        for number, positions in enumerate(chunks):
            sides = pending[number].result()
            pending[number] = None
            if number + 2 < len(chunks):
                pending.append(encoder.submit(encoded, chunks[number + 2]))
            store_chunk(positions, sides)
    check_vocabularies(cfg, tokenizers, tallies.tolist(), say)
    for name in ("src_text", "tgt_text", "src_text_lengths", "tgt_text_lengths"):
        stage.drop(name)
    kept_positions = np.concatenate(kept_positions) if kept_positions else np.zeros(0, dtype=np.int64)
    kept_lengths = np.concatenate(kept_lengths, axis=1) if kept_lengths else np.zeros((2, 0), dtype=np.int64)
    log_length_filters(cfg, len(kept_positions), n_train, say)
    laps("encoding")
    # the examples in the split's order (as in memory), their tokens where the file order put them
    src_starts = np.cumsum(kept_lengths[0]) - kept_lengths[0]
    tgt_starts = np.cumsum(kept_lengths[1] + 1) - (kept_lengths[1] + 1)
    rank = np.empty(n_pairs, dtype=np.int64)
    rank[train_positions] = np.arange(n_train)
    order = np.argsort(rank[kept_positions], kind="stable")
    _, first, inverse = np.unique(pair_hashes, return_index=True, return_inverse=True)
    first_file = files[first][inverse]  # the file each pair came from (the first, for a pair in two)
    for name, values, dtype in (("src_starts", src_starts, np.int64), ("src_lengths", kept_lengths[0], np.int32),
                                ("tgt_starts", tgt_starts, np.int64), ("tgt_lengths", kept_lengths[1], np.int32),
                                ("train_files", first_file[kept_positions], np.int32)):
        stage.append(name, values[order], dtype)
    laps("indexing")
    return {"tokenizers": [tokenizer.to_str() for tokenizer in tokenizers], "fingerprint": digest.hexdigest(),
            "n_train_pairs": n_train, "val_pairs": val_pairs, "log": said}


def with_specials(flat, lengths, before, eos):
    """Sentences of these lengths, end to end in flat, each with the tokens `before` it (SOS, or none) and EOS
    after it: as TranslationDataset lays them out."""
    width = lengths + len(before) + 1
    out = np.full(int(width.sum()), eos, dtype=np.int64)
    starts = np.cumsum(width) - width
    for offset, token in enumerate(before):
        out[starts + offset] = token
    out[np.repeat(starts + len(before), lengths) + np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
    return out


def _left_out_positions(positions, out, log, counted, refused):
    if out:
        log(counted.format(len(out)))
        positions = np.delete(positions, out)
    if not len(positions):
        raise RunError(refused)
    return positions
