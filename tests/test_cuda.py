"""The CUDA path: mixed precision, packed rows, cached decoding, compile, resume from a CPU checkpoint and host
syncs. Every test is skipped without a GPU (`python gpu_check.py` runs them on one)."""
import contextlib
import itertools
import math
import warnings

import pytest
import torch

import batching
import dataset
import runtime
import step
import train
from averaging import WeightAverage
from config import Config
from conftest import (EOS, FIXTURE, PAD, SOS, Crash, assert_same_training, cpu_config, crash_at, make_model, one_batch,
                      random_batch, read_metrics, tiny_args)
from runtime import resolve_autos

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def host_syncs():
    """The list of the host's waits for the GPU within the block, as PyTorch's sync debug mode warns of them."""
    torch.cuda.synchronize()
    syncs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
            syncs += [w for w in caught if "synchroniz" in str(w.message)]
CUDA = torch.device("cuda")


def examples(src_lens, tgt_lens, seed=0):
    sources, targets = random_batch(src_lens, seed=seed), random_batch(tgt_lens, seed=seed + 1)
    return [(sources[i, :s], torch.cat([torch.tensor([SOS]), targets[i, :t - 1]]), targets[i, :t])
            for i, (s, t) in enumerate(zip(src_lens, tgt_lens))]


def losses(dtype, steps=30):
    """Per-step training losses of a tiny model from the same start, in one precision."""
    cfg = Config(dropout=0.0, lr=3e-3)
    model = make_model(d_model=64).to(CUDA).train()
    optimizer, scheduler = step.make_optimizer(cfg, model, CUDA, steps)
    schedule = step.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch = {k: v.to(CUDA) for k, v in one_batch().items()}
    result = []
    for _ in range(steps):
        loss, tokens, _, _ = step.train_step(model, [batch], optimizer, schedule, scaler, runtime.Precision(CUDA, dtype), cfg, PAD)
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
    padded = {k: v.to(CUDA) for k, v in batching.collate(batch_examples, PAD, pad_multiple=8).items()}
    packed = {k: v.to(CUDA) for k, v in batching.collate(batch_examples, PAD, pad_multiple=8, pack_length=12).items()}
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
    cfg = cpu_config()
    model = make_model().to(CUDA).train()
    compiled = torch.compile(model)
    optimizer, scheduler = step.make_optimizer(cfg, model, CUDA, 10)
    schedule = step.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda")
    for seed, (src_lens, tgt_lens) in enumerate([([5, 3, 7], [4, 6, 3]), ([9, 4], [2, 8]),
                                                 ([2, 6, 3, 8], [7, 3, 5, 2]), ([11, 2], [3, 12])]):
        batch = batching.collate(examples(src_lens, tgt_lens, seed), PAD, pad_multiple=8, pack_length=16)
        step.train_step(compiled, [{k: v.to(CUDA) for k, v in batch.items()}], optimizer, schedule, scaler,
                         runtime.Precision(CUDA, torch.float16), cfg, PAD)
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
    cfg = cpu_config(dropout=0.0)
    model = make_model().to(CUDA).train()
    optimizer, scheduler = step.make_optimizer(cfg, model, CUDA, 100)
    schedule = step.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    batch = {k: v.pin_memory() for k, v in one_batch().items()}
    average = WeightAverage(model, 0.99)  # --ema_decay, on by default

    def one_step():
        step.train_step(model, [{k: v.to(CUDA, non_blocking=True) for k, v in batch.items()}], optimizer, schedule,
                         scaler, runtime.Precision(CUDA, dtype), cfg, PAD)
        average.update(model)

    one_step()  # the first step creates the optimizer state and copies the weights into the average
    with host_syncs() as syncs:
        for _ in range(steps):
            one_step()
    return len(syncs) / steps


def test_no_train_step_waits_for_the_gpu_in_any_precision():
    """fp16 (GradScaler), bf16 and fp32 (found_inf): the skip is decided on the GPU, its verdict read a step late;
    the moving average of the weights is updated without reading anything back either."""
    for dtype in (torch.float16, torch.bfloat16, None):
        assert count_syncs(dtype) == 0, dtype


def graph_trainer(cuda_graph, amp, **fields):
    """train.py's own trainer on the fixture, with batches of one fixed shape; without dropout unless asked."""
    fields = {"dropout": 0.0, **fields}
    cfg = resolve_autos(Config(data_files=[FIXTURE], d_model=32, n_heads=2, d_ff=64, n_layers=2, n_unique_layers=1,
                               max_tokens=1024, amp=amp, cuda_graph=cuda_graph, **fields), CUDA)
    data = dataset.prepare_data(cfg, log=lambda message: None)
    trainer, _ = train.build_trainer(cfg, data, None, 0, 1, runtime.Precision(CUDA, runtime.amp_dtype(amp, CUDA)),
                                     lambda m: None)
    collate = batching.make_collate(data.ids["pad"], 8, shape=trainer.sampler.shape)
    batches = [collate([data.train[i] for i in indices]) for indices in trainer.sampler]
    return trainer, [{k: v.pin_memory() for k, v in batch.items()} for batch in batches]


@pytest.mark.parametrize("amp, rel", [("bf16", 2e-3), ("off", 1e-5)])
def test_a_cuda_graph_step_computes_what_eager_steps_compute(amp, rel):
    """Tolerance: the graph may get other cuBLAS kernels than eager steps (its own workspace), whose sums round
    differently; bf16 rounds those differences up to its own precision."""
    results = []
    for cuda_graph in (False, True):
        trainer, batches = graph_trainer(cuda_graph, amp)
        assert isinstance(trainer.step, step.GraphedStep) == cuda_graph
        losses = [float(loss) / int(tokens) for _, loss, tokens, _, _ in train.training_steps(trainer, batches * 2)]
        trainer.schedule.settle()
        results.append((losses, trainer.model.state_dict(), trainer.schedule.scheduler.last_epoch))
    assert len(results[0][0]) > step.GRAPH_WARMUP_STEPS + 3 and trainer.step.graph is not None
    (eager_losses, eager_weights, eager_steps), (graph_losses, graph_weights, graph_steps) = results
    assert graph_losses == pytest.approx(eager_losses, rel=rel) and graph_steps == eager_steps
    for name, weight in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], weight, rtol=rel, atol=rel / 10)


def test_a_cuda_graph_step_skips_a_non_finite_update_and_launches_a_few_kernels():
    from torch.profiler import ProfilerActivity, profile
    trainer, batches = graph_trainer(True, "bf16", ema_decay=0)
    steps = train.training_steps(trainer, itertools.cycle(batches))
    for _ in range(step.GRAPH_WARMUP_STEPS + 2):
        next(steps)
    assert trainer.step.status == "captured"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        start.record()
        for _ in range(4):
            next(steps)
        end.record()
        torch.cuda.synchronize()
    launches = [e for e in profiler.events() if e.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch"))]
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(launches) / 4 <= 12 < 100 <= len(kernels) / 4  # the step's hundreds of kernels in one graph launch
    # the graph was captured before the profiler started: its kernels' times must fit in what CUDA events measured
    kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1000
    assert 0 < kernel_ms <= start.elapsed_time(end) * 1.05
    trainer.schedule.settle()
    rate_steps = trainer.schedule.scheduler.last_epoch
    weights = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    with torch.no_grad():
        trainer.model.output.weight[0, 0] = float("nan")
    next(steps)
    assert trainer.schedule.settle() == [False] and trainer.schedule.scheduler.last_epoch == rate_steps
    for name, value in trainer.model.state_dict().items():
        if name != "output.weight":
            assert torch.equal(value, weights[name]), name


def test_every_cuda_graph_replay_draws_new_dropout_masks():
    """Dropout (on by default on CUDA) inside the graph: a replay must not reuse the masks of the capture. At a
    rate of 1e-30 the weights stay put, so the same batch gives the same loss twice only if the masks repeat."""
    trainer, batches = graph_trainer(True, "bf16", dropout=0.5, lr=1e-30, ema_decay=0)
    losses = [float(loss) / int(tokens) for _, loss, tokens, _, _ in
              train.training_steps(trainer, batches[:1] * (step.GRAPH_WARMUP_STEPS + 4))]
    assert trainer.step.graph is not None and all(map(math.isfinite, losses))
    assert len(set(losses)) == len(losses)


def test_no_cuda_graph_step_waits_for_the_gpu():
    """Sync-debug mode reports what reads the GPU's results, not cudaEventSynchronize: so also keep the GPU busy
    (a sleep kernel) and check that two graph steps are queued behind it before it has finished."""
    trainer, batches = graph_trainer(True, "bf16")
    steps = train.training_steps(trainer, itertools.cycle(batches))
    for _ in range(step.GRAPH_WARMUP_STEPS + 2):
        next(steps)
    assert trainer.step.status == "captured"
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    next(steps)
    next(steps)
    assert not torch.cuda.current_stream().query()  # the host did not wait for either step
    with host_syncs() as syncs:
        for _ in range(4):
            next(steps)
    assert not syncs


def test_a_run_of_cuda_graph_steps_resumes_exactly(tmp_path, monkeypatch):
    """The default on CUDA: fixed batch shapes, replayed as a graph, with dropout. Killed in epoch 2 and resumed
    (warming up eagerly again, then capturing anew), the run must end as the uninterrupted one did (to the
    rounding of graph against eager kernels, see above): a replay draws the masks the eager step it replaces would
    have drawn, from the generator state the checkpoint restored."""
    args = ("--epochs", "3", "--device", "cuda", "--max_tokens", "1024")
    train.main(tiny_args(tmp_path / "straight", *args))
    straight = read_metrics(tmp_path / "straight")
    real_steps, taken = train.training_steps, []

    def steps(trainer, batches):
        assert isinstance(trainer.step, step.GraphedStep)
        for item in real_steps(trainer, batches):
            taken.append(1)
            if len(taken) == straight[0]["step"] + step.GRAPH_WARMUP_STEPS + 2:
                raise Crash
            yield item

    monkeypatch.setattr(train, "training_steps", steps)
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", *args))
    monkeypatch.undo()
    real_step_class, captured = step.GraphedStep, []

    class RecordedGraphedStep(real_step_class):
        def __init__(self, trainer):
            super().__init__(trainer)
            captured.append(self)

    monkeypatch.setattr(train, "GraphedStep", RecordedGraphedStep)
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    assert [graphed.status for graphed in captured] == ["captured"]
    assert_same_training(tmp_path / "straight", tmp_path / "resumed", rel=2e-3)


def test_a_failed_capture_leaves_the_run_training_eagerly(monkeypatch, capsys):
    real_update = step.apply_update

    def update_that_cannot_be_captured(*args):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_update(*args)

    monkeypatch.setattr(step, "apply_update", update_that_cannot_be_captured)
    trainer, batches = graph_trainer(True, "bf16")
    losses = [float(loss) / int(tokens) for _, loss, tokens, _, _ in train.training_steps(trainer, batches * 2)]
    assert trainer.step.status.startswith("failed: operation not permitted") and trainer.step.graph is None
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    captured = capsys.readouterr()
    assert "training goes on without" in captured.err and not captured.out  # stdout stays bench.py's JSON
