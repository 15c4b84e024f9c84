"""Token ids in, batches out: the examples, dynamic padding and packing (`collate`), the batch sampler (random,
length-bucketed, packed, or of one fixed shape), and the DataLoader that serves them. Never truncates.

Knows nothing about the model, the files the pairs came from, or their tokenizers.
"""
import array
import concurrent.futures
import itertools
import math
import random
from functools import partial

import numpy as np
import torch

import runtime
from config import BATCHINGS
from errors import RunError


class TranslationDataset(torch.utils.data.Dataset):
    """Unpadded examples: source + EOS, decoder input SOS + target, labels target + EOS. Every side of every
    example lies in one flat array (in memory, or memory-mapped from the prepared-data cache) with its start and
    length, from which `collate_indices` gathers a whole batch at once; no per-example Python objects are kept."""

    def __init__(self, src_ids, tgt_ids, sos_id, eos_id):
        src_lengths = np.array([len(s) + 1 for s in src_ids], dtype=np.int64)
        tgt_lengths = np.array([len(t) + 1 for t in tgt_ids], dtype=np.int64)
        # sources as s + EOS; targets as SOS + t + EOS, whose first n + 1 tokens are tgt_in and last n + 1 labels
        src_flat = np.fromiter(itertools.chain.from_iterable(s + [eos_id] for s in src_ids), dtype=np.int64,
                               count=int(src_lengths.sum()))
        tgt_flat = np.fromiter(itertools.chain.from_iterable([sos_id] + t + [eos_id] for t in tgt_ids),
                               dtype=np.int64, count=int(tgt_lengths.sum()) + len(tgt_ids))
        self._hold(src_flat, tgt_flat, np.cumsum(src_lengths) - src_lengths, src_lengths,
                   np.cumsum(tgt_lengths + 1) - (tgt_lengths + 1), tgt_lengths)

    @classmethod
    def from_arrays(cls, src_flat, tgt_flat, src_starts, src_lengths, tgt_starts, tgt_lengths):
        """Examples laid out as __init__ lays them out, each side's tokens anywhere in its flat array: example i's
        source at src_flat[src_starts[i]:][:src_lengths[i]], its SOS + target + EOS at tgt_flat[tgt_starts[i]:]."""
        data_set = cls.__new__(cls)
        data_set._hold(src_flat, tgt_flat, src_starts, src_lengths, tgt_starts, tgt_lengths)
        return data_set

    def _hold(self, src_flat, tgt_flat, src_starts, src_lengths, tgt_starts, tgt_lengths):
        self.src_flat, self.tgt_flat = src_flat, tgt_flat
        self.src_starts, self.src_lengths, self.tgt_starts, self.tgt_lengths = (
            src_starts, src_lengths, tgt_starts, tgt_lengths)

    def __len__(self):
        return len(self.src_lengths)

    def __getitem__(self, index):
        src_start, tgt_start = self.src_starts[index], self.tgt_starts[index]
        src_len, tgt_len = self.src_lengths[index], self.tgt_lengths[index]
        return tuple(torch.from_numpy(np.asarray(flat[start:start + length], dtype=np.int64))
                     for flat, start, length in ((self.src_flat, src_start, src_len),
                                                 (self.tgt_flat, tgt_start, tgt_len),
                                                 (self.tgt_flat, tgt_start + 1, tgt_len)))

    def source(self, index):
        """Example index's source ids, without EOS."""
        return self.src_flat[self.src_starts[index]:self.src_starts[index] + self.src_lengths[index] - 1].tolist()

    def target(self, index):
        """Example index's target ids, without SOS and EOS."""
        start = self.tgt_starts[index] + 1
        return self.tgt_flat[start:start + self.tgt_lengths[index] - 1].tolist()

    def lengths(self):
        """(source lengths, target lengths) of the examples as the model sees them, specials included: the arrays
        themselves, not a copy."""
        return self.src_lengths, self.tgt_lengths


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
    src_width, tgt_width = (padded_length(max(pack_length, int(side.max())), multiple) for side in columns(lengths))
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

    examples: (source, decoder input, labels) id tensors. pack_length > 0 packs several sentences end to end into
    each row (see pack_rows) and adds src_segments / tgt_segments: each token's sentence number within its row,
    1, 2, ...; 0 = padding. shape = (rows, source width, target width) packs the examples as BatchSampler's fixed
    shape did (next_fit), into a batch of exactly that shape."""
    sides = [np.concatenate([np.asarray(example[side], dtype=np.int64) for example in examples]) for side in range(3)]
    lengths = np.array([len(example[0]) for example in examples]), np.array([len(example[2]) for example in examples])
    starts = [np.cumsum(side_lengths) - side_lengths for side_lengths in lengths]
    return _lay_out(sides, (starts[0], starts[1], starts[1]), lengths, pad_id, pad_multiple, fixed_lengths,
                    pack_length, shape)


def collate_indices(data_set, indices, pad_id, pad_multiple=1, pack_length=0, shape=None):
    """collate([data_set[i] for i in indices], ...) without making a tensor per sentence: the batch is gathered
    from the dataset's flat arrays by index arithmetic."""
    indices = np.asarray(indices, dtype=np.int64)
    tgt_starts = data_set.tgt_starts[indices]
    return _lay_out((data_set.src_flat, data_set.tgt_flat, data_set.tgt_flat),
                    (data_set.src_starts[indices], tgt_starts, tgt_starts + 1),
                    (data_set.src_lengths[indices], data_set.tgt_lengths[indices]), pad_id, pad_multiple, None,
                    pack_length, shape)


def _lay_out(flats, starts, lengths, pad_id, pad_multiple, fixed_lengths, pack_length, shape):
    """The batch of the examples whose source, decoder input and labels begin at starts[side] in flats[side],
    with (source, target) lengths: laid out by batch_layout, each side scattered into place in one operation."""
    rows, src_width, tgt_width = batch_layout(list(zip(lengths[0].tolist(), lengths[1].tolist())), pad_multiple,
                                              fixed_lengths, pack_length, shape)
    n_rows, rows = len(rows), [row for row in rows if row]  # empty rows (a fixed shape's) come last
    order = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=len(lengths[0]))
    per_row = np.array([len(row) for row in rows])
    row_of_sentence = np.repeat(np.arange(len(rows)), per_row)
    first_of_row = np.cumsum(per_row) - per_row
    number = np.arange(len(order)) - np.repeat(first_of_row, per_row) + 1

    def place(side_lengths):
        """Row, column and position within its sentence of every token of one side, sentences in `order`."""
        side_lengths = side_lengths[order]
        offsets = np.cumsum(side_lengths) - side_lengths  # of each sentence in the side's token stream
        columns = offsets - np.repeat(offsets[first_of_row], per_row)
        within = np.arange(int(side_lengths.sum())) - np.repeat(offsets, side_lengths)
        return (np.repeat(row_of_sentence, side_lengths), np.repeat(columns, side_lengths) + within, within,
                side_lengths)

    def scatter(values, where, width, fill):
        batch = np.full((n_rows, width), fill, dtype=np.int64)
        batch[where[0], where[1]] = values
        return torch.from_numpy(batch)

    def gather(side, where):
        return flats[side][np.repeat(starts[side][order], where[3]) + where[2]]

    src_where, tgt_where = place(lengths[0]), place(lengths[1])
    batch = {"src": scatter(gather(0, src_where), src_where, src_width, pad_id),
             "tgt_in": scatter(gather(1, tgt_where), tgt_where, tgt_width, pad_id),
             "labels": scatter(gather(2, tgt_where), tgt_where, tgt_width, pad_id)}
    if pack_length or shape:
        batch["src_segments"] = scatter(np.repeat(number, src_where[3]), src_where, src_width, 0)
        batch["tgt_segments"] = scatter(np.repeat(number, tgt_where[3]), tgt_where, tgt_width, 0)
    return batch


def make_collate(pad_id, pad_multiple=1, fixed_lengths=None, pack_length=0, shape=None):
    """A picklable collate function, so DataLoader workers can use it."""
    return partial(collate, pad_id=pad_id, pad_multiple=pad_multiple, fixed_lengths=fixed_lengths,
                   pack_length=pack_length, shape=shape)


class IndexedBatches(torch.utils.data.Dataset):
    """A dataset whose items are whole batches: item [indices] is collate_indices of those examples, so a
    DataLoader worker makes a batch in one call instead of one call per sentence."""

    def __init__(self, data_set, **options):
        self.data_set, self.options = data_set, options

    def __getitem__(self, indices):
        return collate_indices(self.data_set, indices, **self.options)


# ---------------------------------------------------------------- batching

def columns(lengths):
    """(source lengths, target lengths) as two integer arrays, from such a pair of arrays (what
    TranslationDataset.lengths() gives, memory-mapped arrays uncopied) or from a sequence of (source, target)."""
    if isinstance(lengths, tuple) and len(lengths) == 2 and all(isinstance(side, np.ndarray) and side.ndim == 1
                                                                 for side in lengths):
        return lengths
    pairs = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


class Plan:
    """An epoch's batches of one rank, as index lists: batch b is flat[starts[b]:ends[b]], all of them in one
    integer array (4 bytes an example, where a list of lists takes about 40)."""

    def __init__(self, flat, starts, ends):
        self.flat, self.starts, self.ends = flat, starts, ends

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return Plan(self.flat, self.starts[item], self.ends[item])
        return self.flat[self.starts[item]:self.ends[item]].tolist()

    def __iter__(self):
        return (self[batch] for batch in range(len(self)))

    def __eq__(self, other):
        return list(self) == list(other)


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
    `draws` (see temperature_draws), a list of (example indices, examples per epoch): each epoch takes that
    many examples of each group instead of every example once, in a stream of seeded reshuffles of the group
    (a group drawn less than its size is seen whole over successive epochs; one drawn more, repeated).
    Memory does not grow by more than a few bytes an example: `lengths` (see columns) are read where they lie,
    and an epoch's order is shuffled in a 4-byte array (by random.shuffle, as a list would be, so that a
    seed gives the batches it always gave).
    """

    def __init__(self, lengths, batch_size, max_tokens=0, batching="bucketed", shuffle=True, seed=0,
                 rank=0, world_size=1, pool_batches=1000, shape=None, draws=None):
        if batching not in BATCHINGS:
            raise ValueError(f"unknown batching {batching!r}")
        self.shape, self.draws = shape, draws
        self.src_lengths, self.tgt_lengths = columns(lengths)
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.batching, self.shuffle, self.seed = batching, shuffle, seed
        self.rank, self.world_size, self.pool_batches = rank, world_size, pool_batches
        self.epoch, self.start_batch, self._planned, self._planner = 0, 0, {}, None
        self.n_examples = len(self.src_lengths)
        self.typecode = "i" if self.n_examples < 2 ** 31 else "q"  # array.array's codes, numpy's too
        if self.n_examples < world_size:
            raise RunError(f"{self.n_examples} training pairs cannot be shared among {world_size} processes")

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self, epoch=None):
        """Every batch of this rank for the current epoch (or this one), including those before start_batch."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._drop_past_plans():
            self._planned[epoch] = concurrent.futures.Future()
            self._planned[epoch].set_result(self._make_batches(epoch))
        return self._planned[epoch].result()

    def plan_ahead(self, epoch):
        """Start planning this epoch's batches on a thread of their own, for batches(epoch) to collect."""
        if epoch not in self._drop_past_plans():
            self._planner = self._planner or concurrent.futures.ThreadPoolExecutor(1, "plan-epochs")
            self._planned[epoch] = self._planner.submit(self._make_batches, epoch)

    def _drop_past_plans(self):
        """The plans kept, those of the current epoch and later ones: counting a run's epochs keeps none of them."""
        self._planned = {key: plan for key, plan in self._planned.items() if key >= self.epoch}
        return self._planned

    def epochs_from(self, epoch, start_batch=0):
        """Batches epoch after epoch without end, from batch start_batch of `epoch`: what one loader serves a run.
        Each epoch's successor is planned while it is served, so that the loader never waits for a plan."""
        while True:
            batches = self.batches(epoch)
            self.plan_ahead(epoch + 1)
            yield from batches[start_batch:]
            epoch, start_batch = epoch + 1, 0

    def _indices(self, values):
        return array.array(self.typecode, np.ascontiguousarray(values, dtype=self.typecode).tobytes())

    def _make_batches(self, epoch):
        rng = random.Random(self.seed * 1_000_003 + epoch)
        indices = array.array(self.typecode, range(self.n_examples)) if self.draws is None else self._drawn(epoch)
        if self.shuffle:
            rng.shuffle(indices)
        if self.batching == "bucketed":
            order = np.frombuffer(indices, dtype=self.typecode)
            pool = self.pool_batches * (self.batch_size if not self.max_tokens else
                                        max(1, self.max_tokens // max(1, self._mean_length())))
            for start in range(0, len(order), pool):
                order[start:start + pool] = order[start:start + pool][np.argsort(self._snake(order[start:start + pool]),
                                                                                 kind="stable")]
            del order
        if self.shape:
            indices, ends = self._first_fit(indices)
        else:
            ends = self._cut(indices)
        starts = np.concatenate([[0], ends[:-1]])
        if self.shuffle:
            batch_order = self._indices(np.arange(len(ends)))
            rng.shuffle(batch_order)
            starts, ends = starts[batch_order], ends[batch_order]
        while len(ends) % self.world_size:  # split the largest batch until every rank gets as many
            largest = int(np.argmax(ends - starts))
            middle = starts[largest] + (ends[largest] - starts[largest]) // 2
            if ends[largest] - starts[largest] < 2:
                raise RunError(f"too few training pairs to give {self.world_size} processes equal batches")
            starts, ends = np.insert(starts, largest + 1, middle), np.insert(ends, largest, middle)
        return self._kept(indices, starts[self.rank::self.world_size], ends[self.rank::self.world_size])

    def _kept(self, indices, starts, ends):
        """The Plan of the batches indices[starts[b]:ends[b]]: moved to the front of `indices` in place (each
        batch only leftwards, in the order they lie), which is then cut short, so that an epoch's order is
        never copied whole: a rank keeps its share of it, and no more."""
        order, kept, position = np.frombuffer(indices, dtype=self.typecode), np.empty_like(starts), 0
        for batch in np.argsort(starts, kind="stable").tolist():
            start, end = int(starts[batch]), int(ends[batch])
            order[position:position + end - start] = order[start:end]
            kept[batch], position = position, position + end - start
        del order  # a view of the array blocks its resizing
        del indices[position:]
        return Plan(np.frombuffer(indices, dtype=self.typecode), kept, kept + (ends - starts))

    def _drawn(self, epoch):
        """This epoch's examples under self.draws: of each group, the next `count` of its stream, the stream being
        the group's members reshuffled afresh (seeded) at every pass through them."""
        order = array.array(self.typecode)
        for number, (members, count) in enumerate(self.draws):
            first, last = epoch * count, (epoch + 1) * count  # positions in the group's stream
            for cycle in range(first // len(members), -(-last // len(members))):
                shuffled = self._indices(members)
                random.Random(f"{self.seed} {number} {cycle}").shuffle(shuffled)
                start = cycle * len(members)
                order += shuffled[max(first, start) - start:min(last, start + len(members)) - start]
        return order

    def _snake(self, indices):
        """Sort keys: by source length, then by target length alternately up and down, so that a batch
        straddling two source lengths holds targets of similar length."""
        src_len, tgt_len = self.src_lengths[indices].astype(np.int64), self.tgt_lengths[indices].astype(np.int64)
        return (src_len << 32) + np.where(src_len % 2 == 0, tgt_len, -tgt_len)

    def _mean_length(self):
        return int(self.src_lengths.sum(dtype=np.int64) + self.tgt_lengths.sum(dtype=np.int64)) // self.n_examples

    def _lengths_in(self, order, chunk=1 << 14):
        """(example, source length, target length) of the examples in this order, read a chunk at a time."""
        for start in range(0, len(order), chunk):
            indices = np.asarray(order[start:start + chunk], dtype=np.int64)
            yield from zip(indices.tolist(), self.src_lengths[indices].tolist(), self.tgt_lengths[indices].tolist())

    def _cut(self, order):
        """Where each batch of the examples in this order ends."""
        ends, size, src_max, tgt_max, real = array.array("q"), 0, 0, 0, 0
        for position, (_, src_len, tgt_len) in enumerate(self._lengths_in(order)):
            new_src, new_tgt, new_real = max(src_max, src_len), max(tgt_max, tgt_len), real + src_len + tgt_len
            if not self.max_tokens:
                full = size == self.batch_size
            elif self.batching == "packed":  # packed rows are almost all real tokens
                full = new_real > self.max_tokens
            else:
                full = (size + 1) * (new_src + new_tgt) > self.max_tokens
            if size and full:
                ends.append(position)
                size, new_src, new_tgt, new_real = 0, src_len, tgt_len, src_len + tgt_len
            size += 1
            src_max, tgt_max, real = new_src, new_tgt, new_real
        if size:
            ends.append(len(order))
        return np.frombuffer(ends, dtype=np.int64)

    def _first_fit(self, order):
        """The examples in this order packed into batches of self.shape's rows (see first_fit): (the examples,
        row after row, batch after batch; where each batch ends)."""
        laid_out, ends = array.array(self.typecode), array.array("q")
        for rows in self.first_fit(order):
            for row in rows:
                laid_out.extend(row)
            ends.append(len(laid_out))
        return laid_out, np.frombuffer(ends, dtype=np.int64)

    def first_fit(self, order):
        """The rows of each batch of self.shape that first-fit makes of the examples in this order."""
        n_rows, src_width, tgt_width = self.shape
        # a row with less room than the shortest example on either side takes no more: it leaves the search
        shortest_src, shortest_tgt = int(self.src_lengths.min()), int(self.tgt_lengths.min())
        rows = []
        src_room, tgt_room, open_rows = [], [], []  # the rows still searched: their room on each side, their examples
        for i, src_len, tgt_len in self._lengths_in(order):
            for k, room in enumerate(src_room):
                if room >= src_len and tgt_room[k] >= tgt_len:
                    break
            else:
                if len(rows) == n_rows:  # fits in no row: the batch is full
                    yield rows
                    rows, src_room, tgt_room, open_rows = [], [], [], []
                rows.append([])
                src_room.append(src_width)
                tgt_room.append(tgt_width)
                open_rows.append(rows[-1])
                k = len(open_rows) - 1
            open_rows[k].append(i)
            src_room[k] -= src_len
            tgt_room[k] -= tgt_len
            if src_room[k] < shortest_src or tgt_room[k] < shortest_tgt:
                del src_room[k], tgt_room[k], open_rows[k]
        yield rows

    def __iter__(self):
        return iter(self.batches()[self.start_batch:])

    def __len__(self):
        return len(self.batches()) - self.start_batch


def temperature_draws(groups, temperature):
    """Examples per epoch of each group (the data file of each example: groups[i]) under temperature sampling
    (as multilingual MT samples its languages): in proportion to the group's size ** (1 / temperature), an epoch
    as many examples as there are. Temperature 1 keeps the sizes; larger ones move towards uniform, so that a
    small file is not drowned by a large one. Returns [(example indices, examples per epoch)], or None at 1."""
    if temperature == 1 or groups is None:
        return None
    names, sizes = np.unique(np.asarray(groups), return_counts=True)
    if len(names) < 2:  # one file: nothing to reweigh
        return None
    members = np.split(np.argsort(groups, kind="stable").astype(np.int32 if len(groups) < 2 ** 31 else np.int64),
                       np.cumsum(sizes)[:-1])
    weights = sizes.astype(np.float64) ** (1 / temperature)
    return [(group, max(1, round(len(groups) * weight / weights.sum()))) for group, weight in zip(members, weights)]


def make_sampler(cfg, lengths, rank=0, world_size=1, shuffle=True, shape=None, groups=None):
    """Training batches as cfg.batching says (of one `shape` when given, see fixed_shape), drawn from the groups
    (each example's data file) by cfg.sampling_temperature; evaluation (shuffle=False) always uses plain
    length-sorted batches of every example."""
    draws = temperature_draws(groups, cfg.sampling_temperature) if shuffle else None
    return BatchSampler(lengths, cfg.batch_size, cfg.max_tokens, cfg.batching if shuffle else "bucketed",
                        shuffle, cfg.seed, rank, world_size, cfg.bucket_pool, shape, draws)


def make_loader(data_set, sampler, cfg, pad_id, device, batches=None):
    """A DataLoader of collated batches for `device`, made in loader processes (see runtime.loader_workers) that
    leave stop signals to the main process; iterate it within runtime.running_loader. batches: the index lists to
    load, laid out as the sampler's are (default: the sampler's epoch), e.g. sampler.epochs_from(...), so that
    one set of processes serves a whole run (at GPU speed an epoch can take less time than starting them)."""
    pack_length = cfg.pack_length if sampler.batching == "packed" else 0
    batches_of = IndexedBatches(data_set, pad_id=pad_id, pad_multiple=runtime.pad_multiple(cfg, device),
                                pack_length=pack_length, shape=sampler.shape)
    # batch_size=None: the sampler's index lists are the items, each made by one __getitem__. A private generator
    # keeps the DataLoader from drawing on the global RNG, which drives dropout: otherwise a resumed run would see
    # different dropout masks than an uninterrupted one.
    return torch.utils.data.DataLoader(
        batches_of, sampler=batches or sampler, batch_size=None, num_workers=runtime.loader_workers(cfg, device),
        pin_memory=device.type == "cuda", generator=torch.Generator(),
        worker_init_fn=runtime.leave_stopping_to_the_main_process)
