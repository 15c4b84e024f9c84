import json
import os
import random
import threading
import tracemalloc
from collections import Counter

import numpy as np
import pytest
import torch

import batching
import dataset
from config import Config
from errors import RunError
from conftest import FIXTURE


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_collate_keeps_every_token_and_eos_of_the_longest_sentence():
    data = batching.TranslationDataset([[5, 6], [7, 8, 9, 10, 11, 12, 13], [14]], [[20], [21, 22], [23, 24, 25, 26, 27]],
                                      sos_id=2, eos_id=3)
    batch = batching.collate([data[i] for i in range(3)], pad_id=0)
    assert batch["src"].tolist()[1] == [7, 8, 9, 10, 11, 12, 13, 3]
    assert batch["labels"].tolist()[2] == [23, 24, 25, 26, 27, 3]
    assert batch["tgt_in"].tolist()[2] == [2, 23, 24, 25, 26, 27]
    assert batch["src"].shape == (3, 8) and batch["labels"].shape == (3, 6)  # padded to its own longest, no more
    assert batching.collate([data[0]], pad_id=0, pad_multiple=8)["src"].shape == (1, 8)


@pytest.mark.parametrize("mode, pack_length", [("bucketed", 0), ("packed", 64)])
def test_every_token_of_the_fixture_reaches_a_batch(mode, pack_length):
    cfg = Config(data_files=[FIXTURE])
    pairs, _, _ = dataset.load_pairs(cfg)
    src_tok, tgt_tok = dataset.train_tokenizers(pairs, cfg)
    ids = dataset.special_ids(tgt_tok)
    src_ids, tgt_ids = dataset.encode(src_tok, [s for s, _ in pairs]), dataset.encode(tgt_tok, [t for _, t in pairs])
    data = batching.TranslationDataset(src_ids, tgt_ids, ids["sos"], ids["eos"])
    sampler = batching.BatchSampler(data.lengths(), batch_size=32, max_tokens=700, batching=mode, seed=3)
    for indices in sampler:
        batch = batching.collate([data[i] for i in indices], ids["pad"], pad_multiple=8, pack_length=pack_length)
        sentences = []  # (source, labels) of every sentence in the batch, as the model receives them
        for row in range(batch["src"].size(0)):
            if pack_length:
                for number in range(1, int(batch["src_segments"][row].max()) + 1):
                    sentences.append((batch["src"][row][batch["src_segments"][row] == number].tolist(),
                                      batch["labels"][row][batch["tgt_segments"][row] == number].tolist()))
            else:
                src, labels = batch["src"][row], batch["labels"][row]
                assert src[:(src != ids["pad"]).sum()].ne(ids["pad"]).all()  # padding only at the end
                sentences.append((src[src != ids["pad"]].tolist(), labels[labels != ids["pad"]].tolist()))
        expected = [(src_ids[i] + [ids["eos"]], tgt_ids[i] + [ids["eos"]]) for i in indices]
        assert sorted(sentences) == sorted(expected)


def test_length_filters_count_tokens_not_characters():
    src = [[1] * 150, [1] * 151, [1] * 5, [1] * 5, [1] * 3]
    tgt = [[1] * 160, [1] * 10, [1] * 15, [1] * 16, [1]]
    assert dataset.length_filter(src, tgt, max_src_tokens=150, max_len_ratio=1, max_len_diff=10) == [0, 2, 4]


def test_unusable_rows_are_dropped_and_counted(tmp_path):
    rows = [{"translation": {"en": "Hello.", "fr": "Bonjour."}}, {"translation": {"en": "  ", "fr": "Vide."}},
            {"translation": {"en": "No target."}}, {"translation": {"en": 3, "fr": "Nombre."}}, {"other": 1},
            {"translation": {"en": " Spaces. ", "fr": " Espaces. "}}]
    path = write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs, dropped = dataset.read_pairs([path], "en", "fr")
    assert pairs == [("Hello.", "Bonjour."), ("Spaces.", "Espaces.")] and dropped == 4


def test_tsv_files_hold_source_tab_target(tmp_path):
    path = write(tmp_path / "pairs.tsv", "Hello.\tBonjour.\nThanks.\tMerci.\n")
    assert dataset.read_pairs([path], "en", "fr")[0] == [("Hello.", "Bonjour."), ("Thanks.", "Merci.")]


@pytest.mark.parametrize("name, text, message", [
    ("broken.jsonl", '{"translation": {"en": "a", "fr": "b"}}\n' * 5 + '{"translation": \n', "broken.jsonl:6: malformed JSON"),
    ("broken.tsv", "a\tb\nno tab here\n", "broken.tsv:2: expected source<TAB>target"),
    ("empty.jsonl", '{"translation": {"en": "", "fr": ""}}\n', "no usable en-fr pairs"),
])
def test_bad_files_fail_with_file_and_line(tmp_path, name, text, message):
    with pytest.raises(RunError, match=message):
        dataset.read_pairs([write(tmp_path / name, text)], "en", "fr")


def test_missing_file_is_named():
    with pytest.raises(RunError, match="data file not found: nowhere.jsonl"):
        dataset.read_pairs(["nowhere.jsonl"], "en", "fr")


def test_parquet_goes_through_the_same_rows(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "pairs.parquet")
    parquet.write_table(pyarrow.Table.from_pylist(
        [{"id": "0", "translation": {"en": "Hello.", "fr": "Bonjour."}}]), path)
    assert dataset.read_pairs([path], "en", "fr")[0] == [("Hello.", "Bonjour.")]


def test_a_parquet_file_replaced_under_the_same_name_and_time_is_read_afresh(tmp_path):
    """The datasets library's cache is keyed on path and modification time: it served the old rows."""
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "pairs.parquet")
    for source in ("Hello.", "Goodbye."):
        parquet.write_table(pyarrow.Table.from_pylist([{"translation": {"en": source, "fr": "Mot."}}]), path)
        os.utime(path, ns=(10 ** 18, 10 ** 18))
        assert dataset.read_pairs([path], "en", "fr")[0] == [(source, "Mot.")]


def test_a_json_file_may_hold_one_array_of_rows(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('\ufeff [{"translation": {"en": "Hi.", "fr": "Salut."}},\n {"translation": {"en": "No."}}]')
    assert dataset.read_pairs([str(path)], "en", "fr") == ([("Hi.", "Salut.")], 1)


def test_validation_is_capped_and_the_rest_trains():
    pairs = [(str(i), str(i)) for i in range(1000)]
    train, val = dataset.split_pairs(pairs, 0.1, seed=1, max_val_pairs=30)
    assert len(val) == 30 and len(train) == 970
    assert val == dataset.split_pairs(pairs, 0.1, seed=1)[1][:30]  # the first of the uncapped split's pairs


def test_split_is_seeded_and_stable():
    pairs = [(str(i), str(i)) for i in range(100)]
    train_a, val_a = dataset.split_pairs(pairs, 0.1, seed=1)
    train_b, val_b = dataset.split_pairs(pairs, 0.1, seed=1)
    assert val_a == val_b and train_a == train_b and len(val_a) == 10
    assert sorted(train_a + val_a) == sorted(pairs)
    assert dataset.split_pairs(pairs, 0.1, seed=2)[1] != val_a


def test_bpe_is_joint_and_restores_spacing_exactly():
    pairs, _, _ = dataset.load_pairs(Config(data_files=[FIXTURE]))
    src_tok, tgt_tok = dataset.train_tokenizers(pairs, Config(tokenizer="bpe", vocab_size=500))
    assert src_tok is tgt_tok
    for text in ["Je n'ai pas faim.", "Where is the  station ?", "« Qu'est-ce que c'est ? » ☃", "Tom"]:
        ids = dataset.encode(src_tok, [text])[0]
        assert dataset.decode(src_tok, ids, word_level=False) == text


def test_word_tokenizers_use_min_frequency_and_specials():
    pairs = [("the cat", "le chat"), ("the dog", "le chien")]
    src_tok, tgt_tok = dataset.train_tokenizers(pairs, Config(tokenizer="word", min_frequency=2))
    assert dataset.special_ids(src_tok) == dataset.special_ids(tgt_tok) == {"pad": 0, "unk": 1, "sos": 2, "eos": 3}
    assert src_tok.token_to_id("the") is not None and src_tok.token_to_id("cat") is None


def test_lowercase_source_folds_only_the_source_and_travels_with_its_tokenizer():
    pairs = [("Forget it.", "Oublie."), ("forget me", "Oublie-moi")]
    src_tok, tgt_tok = dataset.train_tokenizers(pairs, Config(min_frequency=2, lowercase_source=True))
    reloaded = dataset.tokenizer_from_json(src_tok.to_str())  # as a checkpoint stores it for translate.py
    unknown = [[dataset.special_ids(src_tok)["unk"]]]
    assert dataset.encode(reloaded, ["FORGET"]) == dataset.encode(src_tok, ["forget"]) != unknown
    assert tgt_tok.token_to_id("Oublie") is not None and tgt_tok.token_to_id("oublie") is None


def test_word_level_output_reads_naturally():
    pairs = [("x", "Je n'ai pas d'eau, aujourd'hui. Est-ce vrai ? (oui) 50 %")] * 2
    _, tgt_tok = dataset.train_tokenizers(pairs, Config(tokenizer="word", min_frequency=1))
    ids = dataset.encode(tgt_tok, [pairs[0][1]])[0]
    assert dataset.decode(tgt_tok, ids, word_level=True) == "Je n'ai pas d'eau, aujourd'hui. Est-ce vrai ? (oui) 50 %"


def lengths(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    sources = torch.randint(2, 60, (n,), generator=g)
    targets = (sources + torch.randint(-3, 6, (n,), generator=g)).clamp(min=2)  # translations track source length
    return list(zip(sources.tolist(), targets.tolist()))


@pytest.mark.parametrize("mode", batching.BATCHINGS)
def test_sampler_covers_every_example_once_per_epoch(mode):
    sampler = batching.BatchSampler(lengths(), batch_size=16, max_tokens=1000, batching=mode, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = Counter(i for batch in sampler for i in batch)
        assert sorted(seen) == list(range(500)) and set(seen.values()) == {1}


def test_sampler_respects_the_token_budget_and_varies_by_epoch():
    lens = lengths()
    sampler = batching.BatchSampler(lens, batch_size=16, max_tokens=1000, batching="bucketed", seed=0)
    for batch in sampler:
        src, tgt = max(lens[i][0] for i in batch), max(lens[i][1] for i in batch)
        assert len(batch) * (src + tgt) <= 1000 or len(batch) == 1
    first = sampler.batches()
    sampler.set_epoch(1)
    assert sampler.batches() != first
    packed = batching.BatchSampler(lens, batch_size=16, max_tokens=1000, batching="packed", seed=0)
    assert all(sum(sum(lens[i]) for i in batch) <= 1000 or len(batch) == 1 for batch in packed)


def test_a_seed_gives_the_batches_that_shuffling_a_list_gave():
    """Plans live in arrays, not lists, but a seed must draw the very batches it always drew: a checkpoint written
    before resumes its epoch where it stopped, with no pair seen twice or skipped."""
    lens = lengths(301)
    for rank in range(2):
        rng = random.Random(5 * 1_000_003 + 3)
        order = list(range(301))
        rng.shuffle(order)
        batches = [order[start:start + 16] for start in range(0, 301, 16)]
        rng.shuffle(batches)
        largest = max(range(len(batches)), key=lambda b: len(batches[b]))  # 19 batches: one is split for 2 ranks
        batches[largest:largest + 1] = [batches[largest][:8], batches[largest][8:]]
        sampler = batching.BatchSampler(lens, batch_size=16, batching="random", seed=5, rank=rank, world_size=2)
        assert list(sampler.batches(3)) == batches[rank::2]


@pytest.mark.parametrize("shape", [None, (8, 104, 104)])
def test_a_plan_grows_by_a_few_bytes_an_example(shape):
    """What a rank keeps of an epoch's plan, and the most it holds while planning, per extra example: every DDP
    rank plans, so this is what each pays beyond the memory-mapped data (a list of lists took about 40 bytes)."""
    def traced(n):
        generator = np.random.default_rng(0)
        lengths = tuple(generator.integers(3, 100, n).astype(np.int32) for _ in range(2))
        sampler = batching.BatchSampler(lengths, batch_size=32, max_tokens=1600 if shape else 0, rank=1,
                                        world_size=2, shape=shape)
        tracemalloc.start()
        try:
            plan = sampler.batches(0)
            kept, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sum(map(len, plan)) == pytest.approx(n / 2, rel=0.05)
        return kept, peak

    (kept, peak), (more_kept, more_peak) = traced(100_000), traced(300_000)
    assert (more_kept - kept) / 200_000 < 3  # half the epoch at 4 bytes an example, each batch's bounds
    assert (more_peak - peak) / 200_000 < (10 if shape else 5)  # and the epoch's order while it is cut


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    a = batching.BatchSampler(lengths(), batch_size=16, seed=5)
    b = batching.BatchSampler(lengths(), batch_size=16, seed=5)
    a.set_epoch(2)
    b.set_epoch(2, start_batch=7)
    assert list(a)[7:] == list(b) and len(b) == len(a) - 7


def test_bucketing_and_packing_cut_padding():
    lens = lengths(2000)

    def pad_fraction(mode):
        sampler = batching.BatchSampler(lens, batch_size=32, batching=mode, seed=0)
        real = padded = 0
        for batch in sampler:
            rows, src_len, tgt_len = batching.batch_layout([lens[i] for i in batch],
                                                          pack_length=128 if mode == "packed" else 0)
            real += sum(lens[i][0] + lens[i][1] for i in batch)
            padded += len(rows) * (src_len + tgt_len)
        return 1 - real / padded

    assert pad_fraction("packed") < 0.06 and pad_fraction("bucketed") < 0.08 and pad_fraction("random") > 0.4


def test_packed_batches_hold_the_same_sentences_as_random_batches():
    random_batches = batching.BatchSampler(lengths(), batch_size=32, batching="random", seed=4)
    packed = batching.BatchSampler(lengths(), batch_size=32, batching="packed", seed=4)
    assert packed.batches() == random_batches.batches()


def test_pack_rows_places_every_example_once_in_balanced_rows():
    lens = lengths(300, seed=2)
    rows = batching.pack_rows(lens, pack_length=200)
    assert sorted(i for row in rows for i in row) == list(range(300)) and all(rows)
    assert len(rows) == -(-max(sum(s for s, _ in lens), sum(t for _, t in lens)) // 200)
    loads = [sum(lens[i][0] for i in row) for row in rows]
    assert max(loads) - min(loads) < 60  # no row much longer than the others: that would be padding
    assert batching.pack_rows([(5, 5), (300, 280)], pack_length=100) == [[1], [0]]  # long sentences are never cut


def fixed_sampler(lens, max_tokens=4096, seed=0):
    shape = batching.fixed_shape(lens, max_tokens, pack_length=64, multiple=8)
    return batching.BatchSampler(lens, batch_size=32, max_tokens=max_tokens, batching="packed", seed=seed,
                                shape=shape), shape


def test_fixed_shape_batches_all_have_one_shape_and_every_example_once():
    lens = lengths(2000) + [(130, 139)]  # one long pair sets the width: it is never cut
    sampler, shape = fixed_sampler(lens)
    assert shape == (14, 136, 144)  # 4096 // (136 + 144) rows
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen, real = Counter(), 0
        for batch in sampler:
            rows, src_width, tgt_width = batching.batch_layout([lens[i] for i in batch], shape=shape)
            assert (len(rows), src_width, tgt_width) == shape
            for row in rows:  # every row fits, on both sides
                assert sum(lens[batch[i]][0] for i in row) <= src_width
                assert sum(lens[batch[i]][1] for i in row) <= tgt_width
            seen.update(batch)
            real += sum(sum(lens[i]) for i in batch)
        assert sorted(seen) == list(range(len(lens))) and set(seen.values()) == {1}
        # first-fit leaves little pad, the epoch's last, partly filled batch included
        assert 1 - real / (len(sampler) * shape[0] * (shape[1] + shape[2])) < 0.08


def test_next_fit_remakes_the_rows_first_fit_made():
    """The sampler's rows are not passed to the loader's workers, only the order of their examples: the
    workers' next_fit must rebuild exactly the rows the sampler filled, or a batch could overflow its shape."""
    lens = lengths(3000, seed=3)
    sampler, shape = fixed_sampler(lens, max_tokens=2048)
    order = list(range(len(lens)))
    random.Random(1).shuffle(order)
    for rows in sampler.first_fit(order):
        batch = [i for row in rows for i in row]
        remade, _, _ = batching.batch_layout([lens[i] for i in batch], shape=shape)
        assert [[batch[i] for i in row] for row in remade if row] == rows


def test_fixed_shape_collate_fills_the_whole_shape():
    data = batching.TranslationDataset([[5, 6], [7, 8, 9, 10, 11, 12, 13], [14]], [[20], [21, 22], [23, 24, 25]],
                                      sos_id=2, eos_id=3)
    batch = batching.collate([data[i] for i in range(3)], pad_id=0, shape=(4, 8, 8))
    assert all(tensor.shape == (4, 8) for tensor in batch.values())
    assert batch["src_segments"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1],
                                              [1, 1, 0, 0, 0, 0, 0, 0], [0] * 8]  # next-fit rows, then an empty one
    assert (batch["labels"][3] == 0).all()


def test_packed_collate_keeps_every_token_and_numbers_sentences():
    data = batching.TranslationDataset([[5, 6], [7, 8, 9, 10, 11, 12, 13], [14], [15, 16, 17]],
                                      [[20], [21, 22], [23, 24, 25, 26, 27], [28, 29]], sos_id=2, eos_id=3)
    examples = [data[i] for i in range(4)]
    batch = batching.collate(examples, pad_id=0, pack_length=10)
    assert batch["src"].shape == (2, 11) and batch["labels"].shape == (2, 9)  # 17 and 14 tokens in two rows
    found = {}
    for row in range(batch["src"].size(0)):
        for number in batch["src_segments"][row].unique().tolist():
            if number:
                src = batch["src"][row][batch["src_segments"][row] == number].tolist()
                tgt = batch["tgt_segments"][row] == number
                found[tuple(src)] = (batch["tgt_in"][row][tgt].tolist(), batch["labels"][row][tgt].tolist())
    assert found == {tuple(s.tolist()): (t.tolist(), y.tolist()) for s, t, y in examples}
    assert ((batch["src_segments"] == 0) == (batch["src"] == 0)).all()
    assert ((batch["tgt_segments"] == 0) == (batch["labels"] == 0)).all()
    for segments in [*batch["src_segments"], *batch["tgt_segments"]]:  # each sentence in one piece, padding last
        real = segments[segments > 0]
        assert (real.diff() >= 0).all() and (segments[len(real):] == 0).all()


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_sampler_is_disjoint_complete_and_balanced(world_size):
    shards = []
    for rank in range(world_size):
        sampler = batching.BatchSampler(lengths(101), batch_size=16, max_tokens=900, seed=1, rank=rank,
                                       world_size=world_size)
        shards.append([i for batch in sampler for i in batch])
        assert len(sampler) == len(batching.BatchSampler(lengths(101), batch_size=16, max_tokens=900, seed=1,
                                                        rank=0, world_size=world_size))
    everything = [i for shard in shards for i in shard]
    assert sorted(everything) == list(range(101))


def test_decoded_text_is_one_line_even_when_the_model_emits_line_breaks():
    """BPE keeps line breaks as tokens: a translation must still be one output line per input line."""
    pairs = [("one\ntwo", "un\ndeux"), ("three\r\nfour", "trois\u2028quatre")] * 20
    _, tokenizer = dataset.train_tokenizers(pairs, Config(tokenizer="bpe", vocab_size=300))
    for text in ("un\ndeux", "trois\r\nquatre", "a\u2028b\x85c"):
        decoded = dataset.decode(tokenizer, tokenizer.encode(text).ids, word_level=False)
        assert len(decoded.splitlines()) == 1 and decoded.split() == text.split()


def test_a_file_passed_twice_keeps_validation_out_of_training():
    logged = []
    data = dataset.prepare_data(Config(data_files=[FIXTURE, FIXTURE]), log=logged.append)
    training = {(tuple(data.train.source(i)), tuple(data.train.target(i))) for i in range(len(data.train))}
    validation = {(tuple(data.val.source(i)), tuple(data.val.target(i))) for i in range(len(data.val))}
    assert not training & validation
    [warning] = [line for line in logged if "repeat a validation pair" in line]
    assert warning.startswith("warning: ") and int(warning.split()[1]) > len(data.val) // 2


def test_a_deeply_nested_json_line_is_one_line_of_error(tmp_path):
    path = write(tmp_path / "deep.jsonl", '{"translation": {"en": "Hi.", "fr": "Salut."}}\n' + "[" * 200_000 + "\n")
    with pytest.raises(RunError, match="deep.jsonl:2: malformed JSON"):
        dataset.read_pairs([path], "en", "fr")


def loop_collate(examples, pad_id, pad_multiple=1, fixed_lengths=None, pack_length=0):
    """The sentence-by-sentence collate that the vectorised one replaced: the reference it must equal."""
    rows, src_len, tgt_len = batching.batch_layout([(len(s), len(t)) for s, _, t in examples], pad_multiple,
                                                  fixed_lengths, pack_length)

    def pad(side, length, segments=False):
        batch = torch.full((len(rows), length), 0 if segments else pad_id, dtype=torch.long)
        for r, row in enumerate(rows):
            column = 0
            for number, i in enumerate(row, 1):
                sequence = examples[i][side]
                batch[r, column:column + len(sequence)] = number if segments else sequence
                column += len(sequence)
        return batch

    batch = {"src": pad(0, src_len), "tgt_in": pad(1, tgt_len), "labels": pad(2, tgt_len)}
    if pack_length:
        batch["src_segments"], batch["tgt_segments"] = pad(0, src_len, segments=True), pad(2, tgt_len, segments=True)
    return batch


@pytest.mark.parametrize("options", [{}, {"pad_multiple": 8}, {"pack_length": 64, "pad_multiple": 8},
                                     {"pack_length": 10}, {"fixed_lengths": (70, 70)}])
def test_vectorised_collate_equals_the_sentence_by_sentence_one(options):
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        examples = []
        for _ in range(int(torch.randint(1, 40, (), generator=generator))):
            source_length, target_length = torch.randint(1, 60, (2,), generator=generator).tolist()
            target = torch.randint(4, 100, (target_length,), generator=generator)
            examples.append((torch.randint(4, 100, (source_length,), generator=generator),
                             torch.cat([torch.tensor([2]), target[:-1]]), target))
        expected, batch = loop_collate(examples, 0, **options), batching.collate(examples, 0, **options)
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(batch[key], value), (trial, key)


@pytest.mark.parametrize("options", [{}, {"pad_multiple": 8}, {"pack_length": 64, "pad_multiple": 8},
                                     {"shape": (6, 72, 80)}])
def test_batches_gathered_from_the_flat_arrays_equal_collated_examples(options):
    """What the loader's workers make (collate_indices, from one flat array per side) is what collate makes of the
    very examples, in any order of indices."""
    rng = random.Random(0)
    src_ids = [[rng.randrange(4, 100) for _ in range(rng.randrange(0, 40))] for _ in range(200)]
    tgt_ids = [[rng.randrange(4, 100) for _ in range(rng.randrange(0, 40))] for _ in range(200)]
    data = batching.TranslationDataset(src_ids, tgt_ids, 2, 3)
    assert [tuple(t.tolist()) for t in data[7]] == [tuple(src_ids[7] + [3]), tuple([2] + tgt_ids[7]),
                                                  tuple(tgt_ids[7] + [3])]
    for trial in range(20):
        indices = rng.sample(range(200), rng.randrange(1, 12))
        expected = batching.collate([data[i] for i in indices], 0, **options)
        batch = batching.collate_indices(data, indices, 0, **options)
        assert batch.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(batch[key], value), (trial, key)


def test_the_next_epoch_is_planned_on_a_thread_of_its_own_while_this_one_is_served(monkeypatch):
    """First-fit planning takes a second an epoch of the large set: done on the thread that iterates the loader,
    it would stop the GPU's batches for that long at every epoch's start."""
    lens = lengths(3000)
    sampler, _ = fixed_sampler(lens)
    planned_on, real_plan = {}, sampler._make_batches

    def recorded_plan(epoch):
        planned_on[epoch] = threading.current_thread().name
        return real_plan(epoch)

    monkeypatch.setattr(sampler, "_make_batches", recorded_plan)
    served = sampler.epochs_from(0)
    first = next(served)
    assert planned_on[0] == threading.current_thread().name
    sampler.set_epoch(1)
    assert sampler.batches() == fixed_sampler(lens)[0].batches(1)  # the plan it collected is the epoch's own
    assert planned_on[1].startswith("plan-epochs") and first == fixed_sampler(lens)[0].batches(0)[0]
