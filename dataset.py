"""Sentence pairs in, batches of token ids out: loading, splitting, tokenizers, length filters, batching.

Knows nothing about the model. User mistakes (missing files, malformed lines, no usable pairs)
raise SystemExit with one line that names the file and line, so scripts never print a traceback.
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import re
from functools import partial

import torch
import torch.distributed as dist
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import runtime
from config import BATCHINGS

PAD, UNK, SOS, EOS = "[PAD]", "[UNK]", "[SOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, SOS, EOS]


# ---------------------------------------------------------------- loading

def load_pairs(cfg):
    """(source, target) string pairs from local files or the hub, plus the count of unusable rows dropped."""
    if cfg.data_files:
        return read_pairs(cfg.data_files, cfg.lang_src, cfg.lang_tgt)
    name = f"Helsinki-NLP/{cfg.dataset}"
    rows = ((f"{name} row {number}", row) for number, row in enumerate(_hub_rows(cfg.dataset, cfg.lang_src,
                                                                                 cfg.lang_tgt), 1))
    pairs, _, dropped = _usable_pairs(rows, cfg.lang_src, cfg.lang_tgt, name)
    return pairs, dropped


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
        if pair is None and strict:
            raise SystemExit(f"error: {where}: needs a non-empty {src!r} source and {tgt!r} reference")
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
            wheres.append(where)
    if not pairs:
        raise SystemExit(f"error: no usable {src}-{tgt} pairs in {origin} ({dropped} rows dropped)")
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


def _read_rows(path, src, tgt):
    if os.path.isdir(path):
        raise SystemExit(f"error: {path} is a directory; --data_files takes .jsonl, .tsv or .parquet files")
    if not os.path.isfile(path):
        raise SystemExit(f"error: data file not found: {path}")
    if path.endswith(".parquet"):
        import datasets  # slow to import; only the hub and Parquet need it
        try:
            rows = datasets.load_dataset("parquet", data_files=[path], split="train")
        except Exception as error:
            raise SystemExit(f"error: {path}: not a readable Parquet file ({type(error).__name__})") from None
        yield from ((f"{path} row {number}", row) for number, row in enumerate(rows, 1))
        return
    try:
        file = open(path, "rb")  # decoded line by line, so an encoding error names its line
    except OSError as error:
        raise SystemExit(f"error: cannot read {path}: {error.strerror}") from None
    with file:
        for number, raw in enumerate(file, 1):
            where = f"{path}:{number}"
            try:  # a UTF-8 byte-order mark is accepted, and so are Windows line endings
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise SystemExit(f"error: {where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                                 f"{error.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            if path.endswith(".tsv"):
                fields = line.split("\t")
                if len(fields) != 2:
                    raise SystemExit(f"error: {where}: expected source<TAB>target, found {len(fields)} fields")
                yield where, {"translation": {src: fields[0], tgt: fields[1]}}
            else:
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    raise SystemExit(f"error: {where}: malformed JSON ({error.msg})") from None
                except RecursionError:
                    raise SystemExit(f"error: {where}: malformed JSON (nested too deeply)") from None


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
        raise SystemExit(f"error: could not load Helsinki-NLP/{name} ({config}) from the Hugging Face hub ({reason}); "
                         "to train offline pass local files: --data_files pairs.jsonl "
                         '(one {"translation": {"en": ..., "fr": ...}} per line)') from None


def split_pairs(pairs, val_fraction, seed):
    """Seeded split: the same pairs and seed always give the same train/validation sets."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(pairs) * val_fraction))
    if n_val >= len(pairs):
        raise SystemExit(f"error: {len(pairs)} pairs are too few to split off a validation set; add data")
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


# ---------------------------------------------------------------- tokenizers

def train_tokenizers(train_pairs, cfg):
    """Word mode: one WordLevel tokenizer per language. BPE mode: one joint tokenizer, returned twice."""
    sources = [source for source, _ in train_pairs]
    targets = [target for _, target in train_pairs]
    if cfg.tokenizer == "word":
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


# ---------------------------------------------------------------- filtering and the Dataset

def length_filter(src_ids, tgt_ids, max_src_tokens, max_len_diff):
    """Indices of pairs kept by the assignment's filters, measured in tokens (not characters)."""
    return [i for i, (s, t) in enumerate(zip(src_ids, tgt_ids))
            if len(s) <= max_src_tokens and len(t) <= len(s) + max_len_diff]


class TranslationDataset(torch.utils.data.Dataset):
    """Unpadded examples: source + EOS, decoder input SOS + target, labels target + EOS."""

    def __init__(self, src_ids, tgt_ids, sos_id, eos_id):
        self.src_ids, self.tgt_ids, self.sos_id, self.eos_id = src_ids, tgt_ids, sos_id, eos_id

    def __len__(self):
        return len(self.src_ids)

    def __getitem__(self, index):
        src, tgt = self.src_ids[index], self.tgt_ids[index]
        return (torch.tensor(src + [self.eos_id]), torch.tensor([self.sos_id] + tgt), torch.tensor(tgt + [self.eos_id]))

    def lengths(self):
        """(source, target) lengths of each example as the model sees them, specials included."""
        return [(len(s) + 1, len(t) + 1) for s, t in zip(self.src_ids, self.tgt_ids)]


def padded_length(length, multiple):
    return math.ceil(length / multiple) * multiple


def pack_rows(lengths, pack_length):
    """Share examples with these (source, target) lengths out among rows of about pack_length tokens a side,
    or as wide as the longest example if that is wider (the batch is that wide anyway); returns each row's
    example indices. Longest first, each to the row it leaves shortest, so the rows come out nearly equal
    and almost nothing is padding."""
    width = max(pack_length, max(max(s, t) for s, t in lengths))
    total = max(sum(s for s, _ in lengths), sum(t for _, t in lengths))
    n_rows = min(len(lengths), max(1, math.ceil(total / width)))
    rows, loads = [[] for _ in range(n_rows)], [[0, 0] for _ in range(n_rows)]
    for i in sorted(range(len(lengths)), key=lambda i: -sum(lengths[i])):
        src_len, tgt_len = lengths[i]
        best = min(range(n_rows), key=lambda r: (max(loads[r][0] + src_len, loads[r][1] + tgt_len), sum(loads[r])))
        rows[best].append(i)
        loads[best][0] += src_len
        loads[best][1] += tgt_len
    return rows


def fixed_shape(lengths, max_tokens, pack_length, multiple):
    """(rows, source width, target width) of every batch under --batch_shape fixed: rows as wide as the longest
    example on each side (or pack_length), as many as max_tokens (source + target, padding included) allows."""
    src_width = padded_length(max(pack_length, max(s for s, _ in lengths)), multiple)
    tgt_width = padded_length(max(pack_length, max(t for _, t in lengths)), multiple)
    return max(1, max_tokens // (src_width + tgt_width)), src_width, tgt_width


def next_fit(lengths, src_width, tgt_width):
    """Examples in order, each to the current row while it fits, else to a new row. Fed the rows BatchSampler's
    first-fit made, one after another, it remakes exactly those rows: an example went to a later row only
    because it did not fit the earlier ones, which never got emptier."""
    rows, src_load, tgt_load = [], 0, 0
    for i, (src_len, tgt_len) in enumerate(lengths):
        if not rows or src_load + src_len > src_width or tgt_load + tgt_len > tgt_width:
            rows.append([])
            src_load, tgt_load = 0, 0
        rows[-1].append(i)
        src_load, tgt_load = src_load + src_len, tgt_load + tgt_len
    return rows


def batch_layout(lengths, pad_multiple=1, fixed_lengths=None, pack_length=0, shape=None):
    """How collate lays out examples with these (source, target) lengths: the examples in each row
    (one per row unless packing; trailing rows may be empty under a fixed `shape`) and the padded source and
    target widths."""
    if shape:
        rows = next_fit(lengths, shape[1], shape[2])
        return rows + [[] for _ in range(shape[0] - len(rows))], shape[1], shape[2]
    rows = pack_rows(lengths, pack_length) if pack_length else [[i] for i in range(len(lengths))]
    if fixed_lengths:
        return rows, *fixed_lengths
    return (rows, padded_length(max(sum(lengths[i][0] for i in row) for row in rows), pad_multiple),
            padded_length(max(sum(lengths[i][1] for i in row) for row in rows), pad_multiple))


def collate(examples, pad_id, pad_multiple=1, fixed_lengths=None, pack_length=0, shape=None):
    """Pad source and target to this batch's own longest row (or to fixed_lengths); never truncate.

    pack_length > 0 packs several sentences end to end into each row (see pack_rows) and adds
    src_segments / tgt_segments: each token's sentence number within its row, 1, 2, ...; 0 = padding.
    shape = (rows, source width, target width) packs the examples as BatchSampler's fixed shape did (next_fit),
    into a batch of exactly that shape. Each side is one flat tensor of all its sentences, scattered into place
    by index arithmetic."""
    rows, src_len, tgt_len = batch_layout([(len(s), len(t)) for s, _, t in examples], pad_multiple, fixed_lengths,
                                          pack_length, shape)
    n_rows, rows = len(rows), [row for row in rows if row]  # empty rows (a fixed shape's) come last
    order = [i for row in rows for i in row]
    sentences_per_row = torch.tensor([len(row) for row in rows])
    row_of_sentence = torch.arange(len(rows)).repeat_interleave(sentences_per_row)
    first_of_row = sentences_per_row.cumsum(0) - sentences_per_row
    number = torch.arange(len(order)) - first_of_row.repeat_interleave(sentences_per_row) + 1

    def place(side):
        """(rows, columns) of every token of this side, in the order of torch.cat over `order`; and lengths."""
        lengths = torch.tensor([len(examples[i][side]) for i in order])
        starts = lengths.cumsum(0) - lengths  # of each sentence in the flat tensor
        columns = starts - starts[first_of_row].repeat_interleave(sentences_per_row)
        within = torch.arange(int(lengths.sum())) - starts.repeat_interleave(lengths)
        return (row_of_sentence.repeat_interleave(lengths), columns.repeat_interleave(lengths) + within), lengths

    def scatter(values, where, width, fill):
        batch = torch.full((n_rows, width), fill, dtype=torch.long)
        batch[where] = values
        return batch

    (src_where, src_lengths), (tgt_where, tgt_lengths) = place(0), place(2)
    flat = [torch.cat([examples[i][side] for i in order]) for side in range(3)]
    batch = {"src": scatter(flat[0], src_where, src_len, pad_id),
             "tgt_in": scatter(flat[1], tgt_where, tgt_len, pad_id),
             "labels": scatter(flat[2], tgt_where, tgt_len, pad_id)}
    if pack_length or shape:
        batch["src_segments"] = scatter(number.repeat_interleave(src_lengths), src_where, src_len, 0)
        batch["tgt_segments"] = scatter(number.repeat_interleave(tgt_lengths), tgt_where, tgt_len, 0)
    return batch


def make_collate(pad_id, pad_multiple=1, fixed_lengths=None, pack_length=0, shape=None):
    """A picklable collate function, so DataLoader workers can use it."""
    return partial(collate, pad_id=pad_id, pad_multiple=pad_multiple, fixed_lengths=fixed_lengths,
                   pack_length=pack_length, shape=shape)


# ---------------------------------------------------------------- batching

class BatchSampler:
    """Batches of example indices, fresh for every (seed, epoch).

    batching="random" cuts the shuffled examples in order (random batches); "packed" does the same, for
    collate to pack (so batches are as varied as random ones, and a token budget counts real tokens).
    "bucketed" shuffles, sorts pools of ~`pool_batches` batches by length, cuts, then shuffles the batch
    order, so batches hold sentences of similar length and almost nothing is padding.
    Batches are cut by `max_tokens` (source + target tokens, padding to each batch's longest included
    unless packed; rounding up to --pad_multiple is not, so batches do not depend on it) or by
    `batch_size`. A fixed `shape` (rows, source width, target width) instead fills that many rows first-fit:
    each example goes to the first row with room on both sides, and the batch ends at the first example that
    fits in none; its indices come row after row, for collate's next_fit to remake the rows.
    With world_size > 1 each rank gets a disjoint shard with the same number of batches.
    `start_batch` skips batches of the current epoch already trained (mid-epoch resume).
    """

    def __init__(self, lengths, batch_size, max_tokens=0, batching="bucketed", shuffle=True, seed=0,
                 rank=0, world_size=1, pool_batches=1000, shape=None):
        if batching not in BATCHINGS:
            raise ValueError(f"unknown batching {batching!r}")
        self.shape = shape
        self.lengths, self.batch_size, self.max_tokens = lengths, batch_size, max_tokens
        self.batching, self.shuffle, self.seed = batching, shuffle, seed
        self.rank, self.world_size, self.pool_batches = rank, world_size, pool_batches
        self.epoch, self.start_batch, self._cached = 0, 0, {}
        if len(lengths) < world_size:
            raise SystemExit(f"error: {len(lengths)} training pairs cannot be shared among {world_size} processes")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self, epoch=None):
        """Every batch of this rank for the current epoch (or this one), including those before start_batch."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._cached:  # two epochs kept: a run's loader reads ahead into the next one
            self._cached = {key: value for key, value in self._cached.items() if key == self.epoch}
            self._cached[epoch] = self._make_batches(epoch)
        return self._cached[epoch]

    def epochs_from(self, epoch, start_batch=0):
        """Batches epoch after epoch without end, from batch start_batch of `epoch`: what one loader serves a run."""
        while True:
            yield from self.batches(epoch)[start_batch:]
            epoch, start_batch = epoch + 1, 0

    def _make_batches(self, epoch):
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.batching == "bucketed":
            pool = self.pool_batches * (self.batch_size if not self.max_tokens else
                                        max(1, self.max_tokens // max(1, self._mean_length())))
            order = [i for start in range(0, len(order), pool)
                     for i in sorted(order[start:start + pool], key=self._snake)]
        if self.shape:
            batches = [[i for row in rows for i in row] for rows in self._first_fit(order)]
        else:
            batches = self._cut(order)
        if self.shuffle:
            rng.shuffle(batches)
        while len(batches) % self.world_size:  # split the largest batch until every rank gets as many
            largest = max(range(len(batches)), key=lambda b: len(batches[b]))
            batch = batches.pop(largest)
            if len(batch) < 2:
                raise SystemExit(f"error: too few training pairs to give {self.world_size} processes equal batches")
            batches[largest:largest] = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
        return batches[self.rank::self.world_size]

    def _snake(self, i):
        """Sort by source length, then by target length alternately up and down, so that a batch
        straddling two source lengths holds targets of similar length."""
        src_len, tgt_len = self.lengths[i]
        return src_len, tgt_len if src_len % 2 == 0 else -tgt_len

    def _mean_length(self):
        return sum(s + t for s, t in self.lengths) // len(self.lengths)

    def _cut(self, order):
        batches, batch, src_max, tgt_max, real = [], [], 0, 0, 0
        for i in order:
            src_len, tgt_len = self.lengths[i]
            new_src, new_tgt, new_real = max(src_max, src_len), max(tgt_max, tgt_len), real + src_len + tgt_len
            if not self.max_tokens:
                full = len(batch) == self.batch_size
            elif self.batching == "packed":  # packed rows are almost all real tokens
                full = new_real > self.max_tokens
            else:
                full = (len(batch) + 1) * (new_src + new_tgt) > self.max_tokens
            if batch and full:
                batches.append(batch)
                batch, new_src, new_tgt, new_real = [], src_len, tgt_len, src_len + tgt_len
            batch.append(i)
            src_max, tgt_max, real = new_src, new_tgt, new_real
        if batch:
            batches.append(batch)
        return batches

    def _first_fit(self, order):
        """The examples in this order packed into batches of self.shape's rows; returns each batch's rows."""
        n_rows, src_width, tgt_width = self.shape
        # a row with less room than the shortest example on either side takes no more: it leaves the search
        shortest = min(s for s, _ in self.lengths), min(t for _, t in self.lengths)
        batches, rows, open_rows = [], [], []
        for i in order:
            src_len, tgt_len = self.lengths[i]
            k = next((k for k, row in enumerate(open_rows) if row[0] >= src_len and row[1] >= tgt_len), None)
            if k is None:
                if len(rows) == n_rows:  # fits in no row: the batch is full
                    batches.append([row[2] for row in rows])
                    rows, open_rows = [], []
                rows.append([src_width, tgt_width, []])
                open_rows.append(rows[-1])
                k = len(open_rows) - 1
            row = open_rows[k]
            row[0], row[1] = row[0] - src_len, row[1] - tgt_len
            row[2].append(i)
            if row[0] < shortest[0] or row[1] < shortest[1]:
                del open_rows[k]
        return batches + [[row[2] for row in rows]]

    def __iter__(self):
        return iter(self.batches()[self.start_batch:])

    def __len__(self):
        return len(self.batches()) - self.start_batch


# ---------------------------------------------------------------- putting it together

def make_sampler(cfg, lengths, rank=0, world_size=1, shuffle=True, shape=None):
    """Training batches as cfg.batching says (of one `shape` when given, see fixed_shape); evaluation
    (shuffle=False) always uses plain length-sorted batches."""
    return BatchSampler(lengths, cfg.batch_size, cfg.max_tokens, cfg.batching if shuffle else "bucketed",
                        shuffle, cfg.seed, rank, world_size, cfg.bucket_pool, shape)


def make_loader(data_set, sampler, cfg, pad_id, device, batches=None):
    """A DataLoader of collated batches for `device`, made in loader processes (see runtime.loader_workers) that
    leave stop signals to the main process; iterate it through runtime.start_loader. batches: the index lists to
    load, laid out as the sampler's are (default: the sampler's epoch), e.g. sampler.epochs_from(...), so that
    one set of processes serves a whole run (at GPU speed an epoch can take less time than starting them)."""
    pack_length = cfg.pack_length if sampler.batching == "packed" else 0
    collate = make_collate(pad_id, runtime.pad_multiple(cfg, device), None, pack_length, sampler.shape)
    workers = runtime.loader_workers(cfg, device)
    # A private generator keeps the DataLoader from drawing on the global RNG, which drives dropout:
    # otherwise a resumed run would see different dropout masks than an uninterrupted one.
    return torch.utils.data.DataLoader(
        data_set, batch_sampler=batches or sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", generator=torch.Generator(),
        worker_init_fn=runtime.leave_stopping_to_the_main_process)


@dataclasses.dataclass
class Data:
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    ids: dict  # pad/unk/sos/eos ids, the same in both vocabularies
    train: TranslationDataset
    val: TranslationDataset
    val_pairs: list  # raw (source, reference) strings of the validation split
    fingerprint: str  # digest of every loaded pair, in order


def prepare_data(cfg, tokenizers=None, log=print):
    """Load, split, tokenize and filter. Pass `tokenizers` (from a checkpoint) to skip training them."""
    pairs, dropped = load_pairs(cfg)
    log(f"data: {len(pairs):,} pairs ({dropped:,} rows dropped: missing, empty or non-string side)")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction, cfg.seed)
    train_pairs = without_validation_pairs(train_pairs, val_pairs, log)
    src_tokenizer, tgt_tokenizer = tokenizers or train_tokenizers(train_pairs, cfg)
    ids = special_ids(tgt_tokenizer)

    def encode_pairs(pairs):
        return encode(src_tokenizer, [s for s, _ in pairs]), encode(tgt_tokenizer, [t for _, t in pairs])

    train_src, train_tgt = encode_pairs(train_pairs)
    check_vocabularies(cfg, (src_tokenizer, tgt_tokenizer), (train_src, train_tgt), ids["unk"], log)
    keep = length_filter(train_src, train_tgt, cfg.max_src_tokens, cfg.max_len_diff)
    log(f"data: {len(keep):,} training pairs kept, {len(train_src) - len(keep):,} dropped by the length filters "
        f"(source > {cfg.max_src_tokens} tokens or target > source + {cfg.max_len_diff})")
    if not keep:
        raise SystemExit("error: the length filters left no training pairs; raise --max_src_tokens or --max_len_diff")
    val_src, val_tgt = encode_pairs(val_pairs)
    fits = [i for i, (s, t) in enumerate(zip(val_src, val_tgt)) if max(len(s), len(t)) < cfg.max_positions]
    if not fits:
        raise SystemExit(f"error: none of the {len(val_pairs):,} validation pairs fits the model (--max_positions "
                         f"{cfg.max_positions} tokens); raise --max_positions or --val_fraction")
    log(f"data: {len(fits):,} validation pairs; vocabularies {src_tokenizer.get_vocab_size():,} ({cfg.lang_src}) / "
        f"{tgt_tokenizer.get_vocab_size():,} ({cfg.lang_tgt}), tokenizer={cfg.tokenizer}")

    def subset(src_ids, tgt_ids, indices):
        return TranslationDataset([src_ids[i] for i in indices], [tgt_ids[i] for i in indices], ids["sos"],
                                  ids["eos"])

    return Data(src_tokenizer, tgt_tokenizer, ids, subset(train_src, train_tgt, keep), subset(val_src, val_tgt, fits),
                [val_pairs[i] for i in fits], fingerprint(pairs))


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
    kept = [pair for pair in train_pairs if pair not in val_set]
    if len(kept) < len(train_pairs):
        log(f"warning: {len(train_pairs) - len(kept):,} training pairs repeat a validation pair (duplicates in the "
            "data, or a file passed twice); they were left out of training")
    if not kept:
        raise SystemExit("error: every training pair repeats a validation pair; the data holds too few distinct pairs")
    return kept


def check_vocabularies(cfg, tokenizers, encoded, unk_id, log):
    """Refuse a vocabulary of special tokens only (every word would be [UNK], and translations empty while the
    loss looks fine), and warn when unknown words are a large share of the training text."""
    for language, tokenizer, ids in zip((cfg.lang_src, cfg.lang_tgt), tokenizers, encoded):
        if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise SystemExit(f"error: the {language} vocabulary holds only the special tokens: no word occurs "
                             f"--min_frequency {cfg.min_frequency} times in the training split; lower --min_frequency")
        tokens = sum(len(sentence) for sentence in ids)
        unknown = sum(sentence.count(unk_id) for sentence in ids)
        if unknown > 0.5 * tokens:
            log(f"warning: {unknown / tokens:.0%} of the {language} training tokens are unknown words ([UNK]); "
                "lower --min_frequency or use --tokenizer bpe")
