import json
import os
import signal

import pytest
import torch

import dataset
import train
from config import Config
from conftest import PAD, SOS, make_model, random_batch, run_script, tiny_args


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def one_batch(vocab=40):
    tgt = random_batch([4, 6, 3], vocab=vocab, seed=1)
    tgt_in = torch.cat([torch.full((3, 1), SOS), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)
    return {"src": random_batch([5, 3, 7], vocab=vocab), "tgt_in": tgt_in, "labels": tgt}


def test_end_to_end_train_then_translate(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", *tiny_args(run_dir, "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    assert "unique parameters" in result.stdout
    for name in ("last.pt", "best.pt", "metrics.jsonl", "tokenizer_en.json", "tokenizer_fr.json"):
        assert (run_dir / name).exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    [line] = read_metrics(run_dir)
    for key in ("epoch", "step", "train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "lr", "tokens_per_sec",
                "epoch_seconds", "elapsed_seconds"):
        assert key in line
    result = run_script("translate.py", "--checkpoint", str(run_dir / "best.pt"), "--device", "cpu",
                        stdin="I am tired.\n\nCome here!\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == "" and lines[0] and lines[2]


def test_gradscaler_skip_does_not_step_the_scheduler():
    cfg = Config()
    model = make_model().train()
    optimizer, scheduler = train.make_optimizer(cfg, model, torch.device("cpu"), 10)
    schedule = train.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = (torch.device("cpu"), None)
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.output.weight.register_hook(lambda grad: grad * float("inf"))
    _, _, verdicts, _ = train.train_step(model, [one_batch()], optimizer, schedule, scaler, precision, cfg, PAD)
    assert verdicts == [] and scaler.get_scale() == 512.0  # the fp16 verdict is read one step later
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    hook.remove()
    _, _, verdicts, _ = train.train_step(model, [one_batch()], optimizer, schedule, scaler, precision, cfg, PAD)
    assert verdicts == [False] and scheduler.last_epoch == 0
    assert schedule.settle() is True and scheduler.last_epoch == 1


def test_bf16_autocast_trains_on_cpu():
    cfg = Config(amp="bf16")
    model = make_model().train()
    optimizer, scheduler = train.make_optimizer(cfg, model, torch.device("cpu"), 10)
    precision = (torch.device("cpu"), train.amp_dtype(cfg.amp, torch.device("cpu")))
    assert precision[1] == torch.bfloat16
    before = model.output.weight.detach().clone()
    loss, tokens, verdicts, _ = train.train_step(model, [one_batch()], optimizer, train.Schedule(scheduler),
                                                 torch.amp.GradScaler("cpu", enabled=False), precision, cfg, PAD)
    assert verdicts == [True] and torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(before, model.output.weight)


def test_onecycle_ends_exactly_at_its_total(tmp_path):
    train.main(tiny_args(tmp_path, "--epochs", "2"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    lines = read_metrics(tmp_path)
    assert checkpoint["scheduler"]["last_epoch"] == checkpoint["scheduler"]["total_steps"] == lines[-1]["step"]
    assert lines[-1]["lr"] == pytest.approx(1e-3 / 10 / 10)
    train.main(tiny_args(tmp_path / "short", "--epochs", "2", "--max_steps", "7"))
    checkpoint = torch.load(tmp_path / "short" / "last.pt", weights_only=False)
    assert checkpoint["step"] == checkpoint["scheduler"]["last_epoch"] == checkpoint["scheduler"]["total_steps"] == 7


class Crash(Exception):
    pass


def crash_at(monkeypatch, at_step, how):
    """Make train_step crash (like kill -9) or send SIGTERM to this process at a given step."""
    real_step, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_step and how == "kill":
            raise Crash
        result = real_step(*args, **kwargs)
        if len(calls) == at_step and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train, "train_step", step)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ("--epochs", "2", "--dropout", "0.2")
    train.main(tiny_args(tmp_path / "straight", *args))
    steps_per_epoch = read_metrics(tmp_path / "straight")[0]["step"]
    crash_at(monkeypatch, steps_per_epoch + 1, "kill")  # dies in the first step of epoch 2
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", *args))
    assert len(read_metrics(tmp_path / "resumed")) == 1
    monkeypatch.undo()
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert len(resumed) == 2
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = ("--epochs", "2", "--dropout", "0.2")
    train.main(tiny_args(tmp_path / "straight", *args))
    crash_at(monkeypatch, 4, "sigterm")
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tmp_path / "resumed", *args))
    assert exit_info.value.code == 128 + signal.SIGTERM
    checkpoint = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]) == (0, 4, 4)
    monkeypatch.undo()
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert len(resumed) == 2
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)


def test_resume_refuses_a_different_architecture_or_schedule(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--epochs", "1"))
    with pytest.raises(SystemExit, match="--d_model 32 but this run has --d_model 48"):
        train.main(tiny_args(tmp_path, "--epochs", "1", "--resume", "auto", "--d_model", "48"))
    with pytest.raises(SystemExit, match="--epochs 1 but this run has --epochs 3"):
        train.main(tiny_args(tmp_path, "--epochs", "3", "--resume", "auto"))


def test_truncated_checkpoint_gives_one_clear_line(tmp_path):
    train.main(tiny_args(tmp_path, "--epochs", "1"))
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*last.pt: truncated or corrupt"):
        train.main(tiny_args(tmp_path, "--epochs", "1", "--resume", "auto"))
    with pytest.raises(SystemExit, match="checkpoint not found: nothing.pt"):
        train.main(tiny_args(tmp_path, "--resume", "nothing.pt"))


def test_non_finite_loss_stops_the_run_and_keeps_best(tmp_path, monkeypatch):
    real_loss, evaluated = train.compute_loss, []

    def loss(*args, **kwargs):  # training losses turn NaN once the first epoch has been evaluated
        value = real_loss(*args, **kwargs)
        return value * float("nan") if evaluated and torch.is_grad_enabled() else value

    real_evaluate = train.evaluate

    def evaluate(*args, **kwargs):
        evaluated.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "compute_loss", loss)
    monkeypatch.setattr(train, "evaluate", evaluate)
    with pytest.raises(SystemExit, match=r"not finite for 3 consecutive steps \(last at step \d+\); lower --lr") as stop:
        train.main(tiny_args(tmp_path, "--epochs", "2"))
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["epoch"] == 1 and all(torch.isfinite(v).all() for v in best["model"].values())
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 1 and f"last at step {metrics[0]['step'] + 3})" in str(stop.value)


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"translation": {"en": "Hi.", "fr": "Salut."}}\n' * 5 + "{not json\n")
    for args, message in [(["--data_files", str(broken)], "broken.jsonl:6: malformed JSON"),
                          (["--data_files", str(tmp_path / "missing.jsonl")], "data file not found"),
                          (["--n_heads", "3"], "n_heads must divide d_model")]:
        result = run_script("train.py", *tiny_args(tmp_path / "run"), *args)
        assert result.returncode != 0 and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_offline_hub_gives_one_line_pointing_at_data_files(tmp_path):
    env_cache = str(tmp_path / "hf")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=env_cache)
    try:
        result = run_script("train.py", "--epochs", "1", "--device", "cpu", "--run_dir", str(tmp_path / "run"))
    finally:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME"):
            os.environ.pop(name)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--data_files" in result.stderr


@pytest.mark.parametrize("pack_length", [0, 10])
def test_compile_survives_changing_batch_shapes(pack_length):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    import torch._dynamo as dynamo
    dynamo.reset()
    dynamo.utils.counters.clear()
    cfg = Config()
    model = make_model().train()
    compiled = torch.compile(model, backend="aot_eager")  # the inductor backend needs minutes of C++ builds
    optimizer, scheduler = train.make_optimizer(cfg, model, torch.device("cpu"), 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed, lengths in enumerate([[5, 3, 7], [9, 4], [2, 6, 3, 8], [4, 4, 4, 4, 4], [11, 2]]):
        src, tgt = random_batch(lengths, seed=seed), random_batch(lengths[::-1], seed=seed + 9)
        examples = [(s[s != PAD], t[t != PAD], t[t != PAD]) for s, t in zip(src, tgt)]
        batch = dataset.collate(examples, PAD, pack_length=pack_length)
        _, _, verdicts, _ = train.train_step(compiled, [batch], optimizer, train.Schedule(scheduler), scaler,
                                             (torch.device("cpu"), None), cfg, PAD)
        assert verdicts == [True]
    # the second shape makes dynamo mark the sizes dynamic; later shapes reuse that graph
    assert 1 <= dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert "_orig_mod" not in "".join(model.state_dict())


def test_bpe_with_tied_embeddings_trains_and_translates(tmp_path):
    from translate import load_translator, translate_texts
    train.main(tiny_args(tmp_path, "--epochs", "1", "--tokenizer", "bpe", "--vocab_size", "400",
                         "--tie_embeddings", "true", "--amp", "bf16"))
    model, src_tokenizer, tgt_tokenizer, cfg = load_translator(str(tmp_path / "best.pt"), torch.device("cpu"))
    assert src_tokenizer.to_str() == tgt_tokenizer.to_str() and cfg["tie_embeddings"]
    assert model.src_embed.weight is model.output.weight
    [translation] = translate_texts(["I am tired."], model, src_tokenizer, tgt_tokenizer, word_level=False, max_len=5)
    assert isinstance(translation, str)
