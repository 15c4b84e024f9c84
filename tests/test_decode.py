import json

import pytest
import torch

import step
from conftest import EOS, PAD, SOS, make_model, random_batch, run_script
from runtime import Precision
from model import beam_search, greedy_search, length_normalized, output_limits, select_rows, translate


def trained_ish_model(share="none", n_layers=2, n_unique=2):
    """A random model whose outputs are peaked enough that greedy and beam search differ in interesting ways."""
    model = make_model(vocab=30, share=share, n_layers=n_layers, n_unique=n_unique, seed=3)
    with torch.no_grad():
        model.output.weight.mul_(6)
    return model


SOURCES = random_batch([7, 3, 9, 5, 2], vocab=30, seed=4)


@pytest.mark.parametrize("share, n_layers, n_unique", [("none", 2, 2), ("cycle_rev", 4, 2), ("sequence", 3, 1)])
def test_cached_greedy_equals_uncached(share, n_layers, n_unique):
    model = trained_ish_model(share, n_layers, n_unique)
    cached = greedy_search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6, use_cache=True)
    uncached = greedy_search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6, use_cache=False)
    assert cached == uncached and any(len(ids) > 2 for ids in cached)


def test_cache_follows_layer_positions_not_blocks():
    model = trained_ish_model("cycle_rev", 4, 2)
    cache = model.new_cache(7)
    memory, mask = model.encode(SOURCES)
    model.decode(torch.full((5, 1), SOS), memory, mask, cache)
    assert len(cache) == 4 and all(slot["self_key"].shape[2] == 7 for slot in cache)
    assert cache[1]["self_key"] is not cache[2]["self_key"]  # block 1 serves positions 1 and 2
    # ... which see the same memory: its keys and values are computed and kept once, also as rows leave
    assert cache[1]["memory"] is cache[2]["memory"] and cache[0]["memory"] is cache[3]["memory"]
    assert cache[0]["memory"] is not cache[1]["memory"]
    select_rows(cache, torch.tensor([4, 0]), 1)
    assert cache[1]["memory"] is cache[2]["memory"] and cache[1]["memory"][0].shape[0] == 2


def test_memory_keys_values_are_computed_once_per_block():
    model = trained_ish_model("cycle_rev", 4, 2)
    memory, _ = model.encode(SOURCES)
    calls = []
    for block in set(model.decoder_layers):
        block.cross_attn.key_value.register_forward_hook(lambda *args: calls.append(1))
    model.decode(torch.full((5, 3), SOS), memory, (SOURCES != PAD)[:, None, None, :])
    assert len(calls) == 2  # two blocks for four positions


def test_cached_beam_search_equals_uncached():
    model = trained_ish_model("cycle_rev", 4, 2)
    for beam in (2, 4):
        cached = beam_search(model, SOURCES, SOS, EOS, beam=beam, max_len_a=1, max_len_b=8)
        assert cached == beam_search(model, SOURCES, SOS, EOS, beam=beam, max_len_a=1, max_len_b=8, use_cache=False)


def test_length_limit_is_a_times_source_plus_b_within_max_positions():
    src = random_batch([3, 10], vocab=30)
    lengths = (src != PAD).sum(1)
    assert output_limits(lengths, 1.5, 4, 0, 1024).tolist() == [8, 19]
    assert output_limits(lengths, 1.5, 4, 0, 12).tolist() == [8, 11]
    assert output_limits(lengths, 1.5, 4, 5, 1024).tolist() == [5, 5]
    assert output_limits(lengths, 1e30, 4, 0, 1024).tolist() == [1023, 1023]  # no integer overflow to 1 token
    model = trained_ish_model()
    assert all(len(ids) <= limit for ids, limit in zip(greedy_search(model, src, SOS, EOS, 1.5, 4), [8, 19]))


def test_padding_and_dropping_finished_sentences_do_not_change_any_translation():
    """Alone, a sentence never shares its batch; together, sentences leave the running batch as they end."""
    model = trained_ish_model()
    together = greedy_search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6)
    beams = beam_search(model, SOURCES, SOS, EOS, beam=3, max_len_a=1, max_len_b=6)
    for row in range(SOURCES.size(0)):
        alone = SOURCES[row:row + 1, :int((SOURCES[row] != PAD).sum())]
        assert greedy_search(model, alone, SOS, EOS, max_len_a=1, max_len_b=6) == [together[row]]
        assert beam_search(model, alone, SOS, EOS, beam=3, max_len_a=1, max_len_b=6) == [beams[row]]


def test_beam_one_is_greedy():
    model = trained_ish_model()
    assert beam_search(model, SOURCES, SOS, EOS, beam=1, max_len_a=1, max_len_b=6) == \
        greedy_search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6)


def sequence_score(model, src, ids, alpha):
    """Length-normalised log-probability of ids (+ EOS unless it hit the limit) given src."""
    tokens = torch.tensor([[SOS] + ids])
    targets = ids + [EOS]
    with torch.no_grad():
        log_probs = model(src, tokens).log_softmax(-1)[0]
    total = sum(float(log_probs[i, t]) for i, t in enumerate(targets))
    return length_normalized(total, len(targets), alpha)


def test_beam_finds_hypotheses_at_least_as_likely_as_greedy():
    model = trained_ish_model()
    greedy = greedy_search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=20)
    beams = beam_search(model, SOURCES, SOS, EOS, beam=4, alpha=0.6, max_len_a=1, max_len_b=20)
    better = 0
    for row in range(SOURCES.size(0)):
        src = SOURCES[row:row + 1, :int((SOURCES[row] != PAD).sum())]
        beam_score, greedy_score = sequence_score(model, src, beams[row], 0.6), sequence_score(model, src, greedy[row], 0.6)
        assert beam_score >= greedy_score - 1e-5
        better += beam_score > greedy_score + 1e-5
    assert better  # the test model is one where the beam actually helps


def test_translate_restores_input_order_across_batches():
    model = trained_ish_model()
    sources = [row[row != PAD][:-1].tolist() for row in SOURCES]
    expected = greedy_search(model, SOURCES, SOS, EOS)
    assert translate(model, sources, SOS, EOS, max_tokens=12) == expected
    assert translate(model, sources, SOS, EOS, beam=1, max_tokens=12, use_cache=False) == expected


def test_translate_cli_keeps_order_and_empty_lines(checkpoint):
    texts = ["Come here!", "", "I am tired.", "  ", "Where is the station?", "Go."]
    piped = run_script("translate.py", "--checkpoint", checkpoint, "--device", "cpu", stdin="\n".join(texts) + "\n")
    assert piped.returncode == 0, piped.stderr
    lines = piped.stdout.split("\n")[:-1]
    assert len(lines) == len(texts) and lines[1] == "" and lines[3] == ""
    one_by_one = [run_script("translate.py", "--checkpoint", checkpoint, "--device", "cpu", "--", text).stdout.strip()
                  for text in ("Come here!", "Go.")]
    assert one_by_one == [lines[0], lines[5]]


def test_translate_eval_prints_json(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("I am tired.\tJe suis fatigué.\nGo.\tVa !\n")
    result = run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(pairs), "--beam", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 2 and report["beam"] == 2 and report["sentences_per_sec"] > 0
    assert 0 <= report["bleu"] <= 100 and 0 <= report["chrf"] <= 100


def test_bf16_greedy_decoding_agrees_with_fp32():
    """Tolerance: at most 1 of 16 sentences may differ. bf16 keeps 8 bits of mantissa, so two nearly tied
    next tokens can swap, and a swap changes the rest of that sentence; a model that has learnt its data
    has wide margins, so in practice the outputs are identical."""
    from config import Config
    cfg = Config(lr=3e-3, label_smoothing=0.0, dropout=0.0)
    src, tgt = random_batch([3 + i % 5 for i in range(16)], vocab=30), random_batch([2 + i % 6 for i in range(16)],
                                                                                    vocab=30, seed=1)
    tgt_in = torch.cat([torch.full((16, 1), SOS), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)
    model = make_model(vocab=30, d_model=64).train()
    optimizer, scheduler = step.make_optimizer(cfg, model, torch.device("cpu"), 200)
    for _ in range(200):
        step.train_step(model, [{"src": src, "tgt_in": tgt_in, "labels": tgt}], optimizer, step.Schedule(scheduler),
                         torch.amp.GradScaler("cpu", enabled=False), Precision(torch.device("cpu")), cfg, PAD)
    fp32 = greedy_search(model.eval(), src, SOS, EOS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = greedy_search(model, src, SOS, EOS)
    assert sum(a != b for a, b in zip(fp32, bf16)) <= 1
    assert sum(a == row[row != PAD][:-1].tolist() for a, row in zip(fp32, tgt)) >= 12  # it did learn the pairs


def test_int8_linear_layers_compute_nearly_the_fp32_logits():
    """Dynamic int8 quantization changes the logits by rounding only (the README measures BLEU on real text)."""
    from model import int8_linear_layers
    model = trained_ish_model("cycle_rev", 4, 2)
    quantized = int8_linear_layers(model)
    assert not any(isinstance(module, torch.nn.Linear) for module in quantized.modules())
    assert isinstance(model.output, torch.nn.Linear)  # the original model is left as it was
    with torch.no_grad():
        exact, rounded = model(SOURCES, SOURCES[:, :6]), quantized(SOURCES, SOURCES[:, :6])
    assert (exact - rounded).abs().max() < 0.05 * exact.abs().max()
    assert (exact.argmax(-1) == rounded.argmax(-1)).float().mean() > 0.9


def test_translate_int8_flag(checkpoint, tmp_path):
    result = run_script("translate.py", "--checkpoint", checkpoint, "--int8", "I am tired.", "Go.")
    assert result.returncode == 0 and len(result.stdout.split("\n")) == 3 and not result.stderr, result.stderr


def test_cached_decoding_equals_uncached_with_a_shallow_decoder():
    from model import Transformer
    torch.manual_seed(3)
    model = Transformer(30, 30, PAD, d_model=32, n_heads=4, d_ff=64, n_layers=4, n_unique_layers=2,
                        share="cycle_rev", n_decoder_layers=1).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)  # peaked outputs, as in trained_ish_model
    for beam in (1, 3):
        search = greedy_search if beam == 1 else lambda *args, **kw: beam_search(*args, beam=beam, **kw)
        cached = search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6)
        assert cached == search(model, SOURCES, SOS, EOS, max_len_a=1, max_len_b=6, use_cache=False)


def test_a_model_that_would_stop_at_once_still_translates_every_sentence():
    """An undertrained model often rates EOS first: beam search then returned empty translations (GNMT's penalty
    does not rule out a hypothesis of EOS alone), where greedy search and CTranslate2 returned words."""
    model = trained_ish_model()
    with torch.no_grad():  # the decoder's last state is one fixed vector, which the EOS row matches best
        model.decoder_norm.weight.zero_()
        model.decoder_norm.bias.normal_()
        model.output.weight[EOS] = 10 * model.decoder_norm.bias
    for outputs in (greedy_search(model, SOURCES, SOS, EOS), beam_search(model, SOURCES, SOS, EOS, beam=4),
                    beam_search(model, SOURCES, SOS, EOS, beam=4, use_cache=False)):
        assert all(len(output) == 1 for output in outputs)  # one word, then the EOS the model wants
