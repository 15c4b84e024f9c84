"""The CUDA path: mixed precision, packed rows, cached decoding, compile, resume from a CPU checkpoint and host
syncs. Every test is skipped without a GPU (`python gpu_check.py` runs them on one)."""
import warnings

import pytest
import torch

import dataset
import train
from averaging import WeightAverage
from config import Config
from conftest import EOS, PAD, SOS, make_model, random_batch, tiny_args
from test_train import Crash, crash_at, one_batch, read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def examples(src_lens, tgt_lens, seed=0):
    sources, targets = random_batch(src_lens, seed=seed), random_batch(tgt_lens, seed=seed + 1)
    return [(sources[i, :s], torch.cat([torch.tensor([SOS]), targets[i, :t - 1]]), targets[i, :t])
            for i, (s, t) in enumerate(zip(src_lens, tgt_lens))]


def losses(dtype, steps=30):
    """Per-step training losses of a tiny model from the same start, in one precision."""
    cfg = Config(dropout=0.0, lr=3e-3)
    model = make_model(d_model=64).to(CUDA).train()
    optimizer, scheduler = train.make_optimizer(cfg, model, CUDA, steps)
    schedule = train.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch = {k: v.to(CUDA) for k, v in one_batch().items()}
    result = []
    for _ in range(steps):
        loss, tokens, _, _ = train.train_step(model, [batch], optimizer, schedule, scaler, (CUDA, dtype), cfg, PAD)
        result.append(float(loss) / int(tokens))
    schedule.settle()
    return result


def test_fp16_and_bf16_training_track_fp32():
    """Tolerance: 5% of the loss at every step (half precision rounds activations to 3 significant digits)."""
    reference = losses(None)
    assert reference[-1] < reference[0] * 0.7  # it learns
    for dtype in (torch.float16, torch.bfloat16):
        for ours, theirs in zip(losses(dtype), reference):
            assert ours == pytest.approx(theirs, rel=0.05), dtype


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_packed_rows_equal_unpacked_ones_in_half_precision(dtype, atol):
    """Tolerance: logits of size ~1 agree to fp16's (~1e-3 relative) or bf16's (~1e-2) rounding, a few times over."""
    batch_examples = examples([4, 9, 6, 3, 7, 2], [3, 5, 10, 2, 6, 4])
    model = make_model(share="cycle_rev", n_layers=4, n_unique=2).to(CUDA)
    padded = {k: v.to(CUDA) for k, v in dataset.collate(batch_examples, PAD, pad_multiple=8).items()}
    packed = {k: v.to(CUDA) for k, v in dataset.collate(batch_examples, PAD, pad_multiple=8, pack_length=12).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        padded_logits = model(padded["src"], padded["tgt_in"]).float()
        packed_logits = model(packed["src"], packed["tgt_in"], packed["src_segments"], packed["tgt_segments"]).float()
    for row in range(packed["src"].size(0)):
        for number in packed["tgt_segments"][row].unique().tolist():
            if number:
                in_sentence = packed["tgt_segments"][row] == number
                labels = packed["labels"][row][in_sentence]
                i = next(i for i, (_, _, y) in enumerate(batch_examples) if torch.equal(y.to(CUDA), labels))
                torch.testing.assert_close(packed_logits[row][in_sentence], padded_logits[i, :len(labels)],
                                           rtol=0, atol=atol)


def test_cached_decoding_equals_uncached_on_cuda():
    from model import beam_search, greedy_search
    model = make_model(vocab=30, seed=3).to(CUDA)
    with torch.no_grad():
        model.output.weight.mul_(6)
    sources = random_batch([7, 3, 9, 5, 2], vocab=30, seed=4).to(CUDA)
    assert greedy_search(model, sources, SOS, EOS, 1, 8) == greedy_search(model, sources, SOS, EOS, 1, 8,
                                                                           use_cache=False)
    assert beam_search(model, sources, SOS, EOS, 3, 0.6, 1, 8) == beam_search(model, sources, SOS, EOS, 3, 0.6, 1, 8,
                                                                              use_cache=False)


def test_compile_keeps_to_two_graphs_over_varied_shapes():
    import torch._dynamo as dynamo
    dynamo.reset()
    dynamo.utils.counters.clear()
    cfg = Config()
    model = make_model().to(CUDA).train()
    compiled = torch.compile(model)
    optimizer, scheduler = train.make_optimizer(cfg, model, CUDA, 10)
    schedule = train.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda")
    for seed, (src_lens, tgt_lens) in enumerate([([5, 3, 7], [4, 6, 3]), ([9, 4], [2, 8]),
                                                 ([2, 6, 3, 8], [7, 3, 5, 2]), ([11, 2], [3, 12])]):
        batch = dataset.collate(examples(src_lens, tgt_lens, seed), PAD, pad_multiple=8, pack_length=16)
        train.train_step(compiled, [{k: v.to(CUDA) for k, v in batch.items()}], optimizer, schedule, scaler,
                         (CUDA, torch.float16), cfg, PAD)
    assert 1 <= dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_a_cpu_checkpoint_resumes_on_cuda(tmp_path, monkeypatch):
    crash_at(monkeypatch, 10, "kill")  # in epoch 2: last.pt holds epoch 1, written on the CPU
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path, "--epochs", "2"))
    monkeypatch.undo()
    train.main([*tiny_args(tmp_path, "--epochs", "2", "--resume", "auto"), "--device", "cuda"])
    lines = read_metrics(tmp_path)
    assert len(lines) == 2 and lines[1]["skipped_steps"] < 5


def count_syncs(dtype, steps=4):
    cfg = Config(dropout=0.0)
    model = make_model().to(CUDA).train()
    optimizer, scheduler = train.make_optimizer(cfg, model, CUDA, 100)
    schedule = train.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch = {k: v.pin_memory() for k, v in one_batch().items()}
    average = WeightAverage(model, 0.99)  # --ema_decay, on by default

    def step():
        train.train_step(model, [{k: v.to(CUDA, non_blocking=True) for k, v in batch.items()}], optimizer, schedule,
                         scaler, (CUDA, dtype), cfg, PAD)
        average.update(model)

    step()  # the first step creates the optimizer state and copies the weights into the average
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def test_no_train_step_waits_for_the_gpu_in_any_precision():
    """fp16 (GradScaler), bf16 and fp32 (found_inf): the skip is decided on the GPU, its verdict read a step late;
    the moving average of the weights is updated without reading anything back either."""
    for dtype in (torch.float16, torch.bfloat16, None):
        assert count_syncs(dtype) == 0, dtype
