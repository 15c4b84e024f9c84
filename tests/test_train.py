import copy
import dataclasses
import os
import signal

import pytest
import torch

import batching
import budget
import config
import conftest
import dataset
import evaluation
import runtime
import step
import train
from config import Config
from conftest import (PAD, Crash, assert_same_training, cpu_config, crash_at, make_model, one_batch, random_batch,
                      read_metrics, run_script, tiny_args)
from runtime import Precision


def test_end_to_end_train_then_translate(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", *tiny_args(run_dir, "--epochs", "1"))
    assert result.returncode == 0, result.stderr
    assert "unique parameters" in result.stdout
    for name in ("last.pt", "best.pt", "metrics.jsonl", "tokenizer_en.json", "tokenizer_fr.json"):
        assert (run_dir / name).exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    [line] = read_metrics(run_dir)
    assert line["weights"] == "ema"  # --ema_decay 0.998 by default: the moving average is evaluated and saved
    for key in ("epoch", "step", "train_loss", "val_loss", "bleu", "chrf", "cer", "wer", "lr", "tokens_per_sec",
                "epoch_seconds", "elapsed_seconds"):
        assert key in line
    result = run_script("translate.py", "--checkpoint", str(run_dir / "best.pt"), "--device", "cpu",
                        stdin="I am tired.\n\nCome here!\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[3] == "" and lines[0] and lines[2]


def test_gradscaler_skip_does_not_step_the_scheduler():
    cfg = cpu_config()
    model = make_model().train()
    optimizer, scheduler = step.make_optimizer(cfg, model, torch.device("cpu"), 10)
    schedule = step.Schedule(scheduler)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = Precision(torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.output.weight.register_hook(lambda grad: grad * float("inf"))
    _, _, verdicts, _ = step.train_step(model, [one_batch()], optimizer, schedule, scaler, precision, cfg, PAD)
    assert verdicts == [] and scaler.get_scale() == 512.0  # the fp16 verdict is read one step later
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    hook.remove()
    _, _, verdicts, _ = step.train_step(model, [one_batch()], optimizer, schedule, scaler, precision, cfg, PAD)
    assert verdicts == [False] and scheduler.last_epoch == 1  # the second update's advance: not known to be bad
    assert schedule.settle() == [True] and scheduler.last_epoch == 1


@pytest.mark.parametrize("decay_norms_and_biases", [True, False])
def test_weight_decay_spares_norms_and_biases_only_when_asked(decay_norms_and_biases):
    """With zero gradients AdamW's only change is the decay: it shrinks every matrix and embedding, and the LayerNorm
    weights and the biases too unless --decay_norms_and_biases is false."""
    cfg = cpu_config(decay_norms_and_biases=decay_norms_and_biases)
    model = make_model()
    optimizer, _ = step.make_optimizer(cfg, model, torch.device("cpu"), 10)
    with torch.no_grad():  # biases start at zero, which no decay changes
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():
        shrunk = p.abs().sum() < before[name].abs().sum()
        assert shrunk == (p.dim() > 1 or decay_norms_and_biases), name


def test_bf16_autocast_trains_on_cpu():
    cfg = cpu_config(amp="bf16")
    model = make_model().train()
    optimizer, scheduler = step.make_optimizer(cfg, model, torch.device("cpu"), 10)
    precision = runtime.Precision(torch.device("cpu"), runtime.amp_dtype(cfg.amp, torch.device("cpu")))
    assert precision.dtype == torch.bfloat16
    before = model.output.weight.detach().clone()
    loss, tokens, verdicts, _ = step.train_step(model, [one_batch()], optimizer, step.Schedule(scheduler),
                                                 torch.amp.GradScaler("cpu", enabled=False), precision, cfg, PAD)
    assert verdicts == [True] and torch.isfinite(loss) and loss.dtype == torch.float32
    assert not torch.equal(before, model.output.weight)


def test_onecycle_ends_exactly_at_its_total(tmp_path):
    train.main(tiny_args(tmp_path, "--epochs", "2"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    lines = read_metrics(tmp_path)
    assert checkpoint["scheduler"]["last_epoch"] == checkpoint["scheduler"]["total_steps"] == lines[-1]["step"]
    cfg = cpu_config()
    assert lines[-1]["lr"] == pytest.approx(cfg.lr / cfg.div_factor / cfg.final_div_factor)
    train.main(tiny_args(tmp_path / "short", "--epochs", "2", "--max_steps", "7"))
    checkpoint = torch.load(tmp_path / "short" / "last.pt", weights_only=False)
    assert checkpoint["step"] == checkpoint["scheduler"]["last_epoch"] == checkpoint["scheduler"]["total_steps"] == 7


@pytest.mark.parametrize("decay", [(), ("--decay_norms_and_biases", "true")])  # two parameter groups or one
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, decay):
    args = ("--epochs", "2", "--dropout", "0.2", *decay)
    train.main(tiny_args(tmp_path / "straight", *args))
    steps_per_epoch = read_metrics(tmp_path / "straight")[0]["step"]
    crash_at(monkeypatch, steps_per_epoch + 1, "kill")  # dies in the first step of epoch 2
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", *args))
    assert len(read_metrics(tmp_path / "resumed")) == 1
    monkeypatch.undo()
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    assert len(read_metrics(tmp_path / "resumed")) == 2
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.parametrize("averaging", [("--ema_decay", "0"), ("--ema_decay", "0.8")])
def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, averaging):
    args = ("--epochs", "2", "--dropout", "0.2", *averaging)
    train.main(tiny_args(tmp_path / "straight", *args))
    crash_at(monkeypatch, 4, "sigterm")
    with pytest.raises(SystemExit) as exit_info:
        train.main(tiny_args(tmp_path / "resumed", *args))
    assert exit_info.value.code == 128 + signal.SIGTERM
    checkpoint = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["step"]) == (0, 4, 4)
    monkeypatch.undo()
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    assert len(read_metrics(tmp_path / "resumed")) == 2
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")


def test_moving_average_of_the_weights_is_what_is_evaluated_and_saved(tmp_path, monkeypatch):
    decay, trained = 0.8, []
    real_step = step.train_step

    def patched_step(model, *args, **kwargs):
        result = real_step(model, *args, **kwargs)
        trained.append({name: p.detach().clone() for name, p in model.state_dict().items()})
        return result

    monkeypatch.setattr(step, "train_step", patched_step)
    train.main(tiny_args(tmp_path, "--epochs", "1", "--ema_decay", str(decay)))
    expected = dict(trained[0])
    for n, weights in enumerate(trained[1:], 1):
        warmed = min(decay, (1 + n) / (10 + n))  # the average's warm-up (averaging.WeightAverage)
        expected = {name: warmed * expected[name] + (1 - warmed) * weights[name] for name in weights}
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["ema_updates"] == len(trained) > 1
    for name, value in checkpoint["model"].items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
        assert torch.equal(checkpoint["training_model"][name], trained[-1][name])
    assert not torch.equal(checkpoint["model"]["output.weight"], checkpoint["training_model"]["output.weight"])
    [line] = read_metrics(tmp_path)
    assert line["weights"] == "ema"
    import translate
    model = translate.load_translator(tmp_path / "best.pt", torch.device("cpu"))[0]
    assert torch.equal(model.output.weight, checkpoint["model"]["output.weight"])


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


@pytest.mark.parametrize("scores, chosen", [
    ([{"val_loss": 3.0, "bleu": 10.0}, {"val_loss": 3.1, "bleu": 12.0}, {"val_loss": 3.2, "bleu": 11.0}], 1),
    ([{"val_loss": 3.1}, {"val_loss": 3.0}, {"val_loss": 3.2}], 1),  # --n_eval_sentences 0: no BLEU
    ([{"val_loss": 3.1, "bleu": 12.0}, {"val_loss": 3.0, "bleu": 12.0}, {"val_loss": 3.2, "bleu": 9.0}], 1),
])
def test_best_pt_holds_the_evaluation_with_the_highest_bleu(tmp_path, monkeypatch, capsys, scores, chosen):
    """The validation loss turns up while BLEU still climbs; best.pt follows BLEU, the loss breaking ties."""
    evaluations = iter(scores)
    monkeypatch.setattr(evaluation, "evaluate", lambda *args: (dict(next(evaluations)), []))
    train.main(tiny_args(tmp_path, "--epochs", "3"))
    steps = [line["step"] for line in read_metrics(tmp_path)]
    assert len(set(steps)) == 3 and torch.load(tmp_path / "best.pt", weights_only=True)["step"] == steps[chosen]
    done = capsys.readouterr().out.strip().splitlines()[-1]  # names the checkpoint to translate with, and best.pt
    assert done.startswith(f"done: translate with {tmp_path / 'last.pt'} (step {steps[-1]}")
    assert done.endswith(f"{tmp_path / 'best.pt'} holds the best evaluation, step {steps[chosen]}")


def test_non_finite_loss_stops_the_run_and_keeps_best(tmp_path, monkeypatch):
    real_loss, evaluated = step.compute_loss, []

    def loss(*args, **kwargs):  # training losses turn NaN once the first epoch has been evaluated
        value = real_loss(*args, **kwargs)
        return value * float("nan") if evaluated and torch.is_grad_enabled() else value

    real_evaluate = evaluation.evaluate

    def evaluate(*args, **kwargs):
        evaluated.append(1)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(step, "compute_loss", loss)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
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
                          (["--n_heads", "3"], "--n_heads must divide --d_model")]:
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
    command = result.stderr.split("`")[1]  # the command the message names works from the clone's root
    assert command.startswith("python train.py --data_files tests/fixtures/pairs.jsonl")
    assert os.path.isfile(os.path.join(conftest.ROOT, command.split()[3]))


@pytest.mark.parametrize("pack_length", [0, 10])
def test_compile_survives_changing_batch_shapes(pack_length):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    import torch._dynamo as dynamo
    dynamo.reset()
    dynamo.utils.counters.clear()
    cfg = cpu_config()
    model = make_model().train()
    compiled = torch.compile(model, backend="aot_eager")  # the inductor backend needs minutes of C++ builds
    optimizer, scheduler = step.make_optimizer(cfg, model, torch.device("cpu"), 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed, lengths in enumerate([[5, 3, 7], [9, 4], [2, 6, 3, 8], [4, 4, 4, 4, 4], [11, 2]]):
        src, tgt = random_batch(lengths, seed=seed), random_batch(lengths[::-1], seed=seed + 9)
        examples = [(s[s != PAD], t[t != PAD], t[t != PAD]) for s, t in zip(src, tgt)]
        batch = batching.collate(examples, PAD, pack_length=pack_length)
        _, _, verdicts, _ = step.train_step(compiled, [batch], optimizer, step.Schedule(scheduler), scaler,
                                             Precision(torch.device("cpu")), cfg, PAD)
        assert verdicts == [True]
    # the second shape makes dynamo mark the sizes dynamic; later shapes reuse that graph
    assert 1 <= dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert "_orig_mod" not in "".join(model.state_dict())


def test_tokenizer_auto_picks_by_the_training_split_and_a_resumed_run_keeps_its_choice(tmp_path, monkeypatch):
    """auto: word-level vocabularies below config.LARGE_DATA_PAIRS training pairs, one joint BPE vocabulary with tied
    embeddings from there on; the checkpoint records the choice, and a resume with the defaults keeps it."""
    def saved(run_dir):
        checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
        return checkpoint["config"], checkpoint["tokenizers"]

    train.main(tiny_args(tmp_path / "few", "--epochs", "1", "--vocab_size", "400"))
    cfg, (src, tgt) = saved(tmp_path / "few")
    assert (cfg["tokenizer"], cfg["tie_embeddings"]) == ("word", False) and src != tgt
    monkeypatch.setattr(config, "LARGE_DATA_PAIRS", 100)  # the fixture's 291 training pairs now count as many
    train.main(tiny_args(tmp_path / "many", "--epochs", "2", "--vocab_size", "400"))
    cfg, (src, tgt) = saved(tmp_path / "many")
    assert (cfg["tokenizer"], cfg["tie_embeddings"]) == ("bpe", True) and src == tgt
    crash_at(monkeypatch, read_metrics(tmp_path / "many")[0]["step"] + 1, "kill")
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", "--epochs", "2", "--vocab_size", "400"))
    monkeypatch.undo()  # the threshold too: the resumed run keeps its checkpoint's choice, not a new one
    train.main(tiny_args(tmp_path / "resumed", "--epochs", "2", "--vocab_size", "400", "--resume", "auto"))
    assert saved(tmp_path / "resumed")[0]["tokenizer"] == "bpe"
    assert [line["val_loss"] for line in read_metrics(tmp_path / "resumed")] == pytest.approx(
        [line["val_loss"] for line in read_metrics(tmp_path / "many")], abs=1e-6)
    train.main(tiny_args(tmp_path / "untied", "--epochs", "1", "--vocab_size", "400", "--tie_embeddings", "false"))
    assert saved(tmp_path / "untied")[0]["tie_embeddings"] is False


def test_bpe_with_tied_embeddings_trains_and_translates(tmp_path):
    from translate import load_translator, translate_texts
    train.main(tiny_args(tmp_path, "--epochs", "1", "--tokenizer", "bpe", "--vocab_size", "400",
                         "--tie_embeddings", "true", "--amp", "bf16"))
    model, src_tokenizer, tgt_tokenizer, cfg = load_translator(str(tmp_path / "best.pt"), torch.device("cpu"))
    assert src_tokenizer.to_str() == tgt_tokenizer.to_str() and cfg["tie_embeddings"]
    assert model.src_embed.weight is model.output.weight
    [translation] = translate_texts(["I am tired."], model, src_tokenizer, tgt_tokenizer, word_level=False, max_len=5)
    assert isinstance(translation, str)


def test_resume_may_change_precision_and_optimizer_kernels(tmp_path, monkeypatch):
    """A checkpoint from a run without fp16 (empty GradScaler state) and with the unfused optimizer, resumed under
    fp16 with a GradScaler and fused AdamW, as a CPU checkpoint resumed on CUDA would be."""
    crash_at(monkeypatch, 10, "kill")  # in epoch 2: last.pt holds epoch 1
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path, "--epochs", "2", "--amp", "off"))
    monkeypatch.undo()
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    for group in checkpoint["optimizer"]["param_groups"]:
        group.update(fused=False, foreach=True)
    assert checkpoint["scaler"] == {}
    torch.save(checkpoint, tmp_path / "unfused.pt")
    train.main(tiny_args(tmp_path / "fp16", "--epochs", "2", "--amp", "fp16", "--resume", str(tmp_path / "unfused.pt")))
    resumed = torch.load(tmp_path / "fp16" / "last.pt", weights_only=True)
    assert resumed["step"] == resumed["total_steps"] > checkpoint["step"] and resumed["scaler"]["scale"] > 0
    assert all(group["fused"] for group in resumed["optimizer"]["param_groups"])
    assert resumed["ranks"][0]["partial"]["skipped"] == 0 and read_metrics(tmp_path / "fp16")[-1]["skipped_steps"] < 7


def test_fp16_stops_on_a_lasting_overflow(tmp_path, monkeypatch):
    real_loss = step.compute_loss
    monkeypatch.setattr(step, "compute_loss", lambda *args, **kwargs: real_loss(*args, **kwargs) * float("inf"))
    with pytest.raises(SystemExit, match=r"not finite for 27 consecutive steps \(last at step 28\)"):
        train.main(tiny_args(tmp_path, "--epochs", "6", "--amp", "fp16"))  # 3 + 24 halvings of the loss scale


def sgd_step(model, batches, precision=Precision(torch.device("cpu"))):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = step.Schedule(torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0))
    step.train_step(model, batches, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), precision,
                     cpu_config(dropout=0.0), PAD)
    return model.state_dict()


def test_gradient_accumulation_equals_one_batch_as_large():
    examples = [(s[s != PAD], t[t != PAD], t[t != PAD]) for s, t in zip(random_batch([5, 3, 7, 2, 9, 4], seed=5),
                                                                        random_batch([4, 6, 3, 8, 2, 5], seed=6))]
    big = batching.collate(examples, PAD)
    parts = [batching.collate(examples[:2], PAD), batching.collate(examples[2:5], PAD, pack_length=10),
             batching.collate(examples[5:], PAD)]
    accumulated, single = sgd_step(make_model().train(), parts), sgd_step(make_model().train(), [big])
    moved = max(float((value - make_model().state_dict()[name]).abs().max()) for name, value in single.items())
    assert moved > 1e-2
    for name, value in single.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-6, msg=name)


def test_fused_adamw_step_equals_the_unfused_update():
    cfg = cpu_config()
    optimizer = step.make_optimizer(cfg, make_model(), torch.device("cpu"), 10)[0]
    assert optimizer.param_groups[0]["fused"]
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(p.shape, generator=generator) for p in make_model().parameters()]
    states = []
    for fused in (True, False):
        model = make_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        for _ in range(3):
            for parameter, gradient in zip(model.parameters(), gradients):
                parameter.grad = gradient.clone()
            optimizer.step()
        states.append(model.state_dict())
    moved = max(float((value - make_model().state_dict()[name]).abs().max()) for name, value in states[0].items())
    assert moved > 1e-3
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_readme_reference_command_builds_the_reference_recipe():
    """Three-phase linear OneCycle (peak 1e-3, 10% warm-up, div factors 10), random batches of 32, dropout 0.1
    everywhere, momentum cycled, fp32: the recipe the project descends from, run by the one command the docs
    give, which spells out every flag of it: editing config.py's defaults must not change it."""
    docs = open(os.path.join(os.path.dirname(train.__file__), "docs", "experiments.md")).read()
    section = docs[docs.index("## Reproduce the reference recipe"):]
    command = next(line for line in section.splitlines() if line.startswith("python train.py"))
    cfg = Config.from_args(command.split()[2:])
    assert (cfg.batching, cfg.batch_size, cfg.max_tokens, cfg.accum_steps) == ("random", 32, 0, 1)
    assert (cfg.dropout, cfg.attn_dropout, cfg.amp, cfg.epochs, cfg.max_minutes) == (0.1, 0.1, "off", 17, 0)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.n_unique_layers, cfg.share) == \
        (512, 8, 128, 6, 3, "cycle_rev")
    assert (cfg.n_decoder_layers or cfg.n_layers) == 6 and cfg.ema_decay == 0 and cfg.tokenizer == "word"
    assert not cfg.lowercase_source
    assert (cfg.max_len_ratio, cfg.max_len_diff, cfg.sampling_temperature) == (1, 10, 1)  # target <= source + 10
    assert cfg.weight_decay == 0.01 and cfg.decay_norms_and_biases  # every parameter decayed
    total = 1000
    reference_optimizer = torch.optim.AdamW(make_model().parameters())
    reference = torch.optim.lr_scheduler.OneCycleLR(reference_optimizer, max_lr=1e-3, total_steps=total,
                                                    pct_start=0.1, anneal_strategy="linear", div_factor=10,
                                                    final_div_factor=10, three_phase=True)
    optimizer, ours = step.make_optimizer(cfg, make_model(), torch.device("cpu"), total)
    for _ in range(total):
        assert ours.get_last_lr() == reference.get_last_lr()
        assert optimizer.param_groups[0]["betas"] == reference_optimizer.param_groups[0]["betas"]
        ours.step()
        reference.step()


def fake_clock(monkeypatch, seconds_per_step, seconds_per_evaluation=0.0):
    """train.py's clock advances only when a step or an evaluation runs: seconds_per_step(n) for the n-th step
    of this call. Budget tests then do not depend on how fast or busy the machine is."""
    now, calls = [0.0], []
    real_step, real_evaluate = step.train_step, evaluation.evaluate

    def patched_step(*args, **kwargs):
        calls.append(1)
        now[0] += seconds_per_step(len(calls))
        return real_step(*args, **kwargs)

    def evaluate(*args, **kwargs):
        now[0] += seconds_per_evaluation
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "clock", lambda: now[0])
    monkeypatch.setattr(step, "train_step", patched_step)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)


def test_max_minutes_sizes_the_schedule_and_resume_keeps_it(tmp_path, monkeypatch):
    """Steps take 0.05 s, a 6 s budget holds 120 of them; evaluations take 100 s, which the budget and the
    step timing (steps 2-12, across the end of epoch 1) must both leave out."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))  # a tiny model's steps need no long timing
    args = ("--epochs", "1000", "--max_minutes", "0.1")
    fake_clock(monkeypatch, lambda n: 0.05, seconds_per_evaluation=100.0)
    train.main(tiny_args(tmp_path / "budget", *args))
    checkpoint = torch.load(tmp_path / "budget" / "last.pt", weights_only=True)
    total, schedule = checkpoint["total_steps"], checkpoint["scheduler"]
    assert checkpoint["calibrated"] and 119 <= total <= 120 and checkpoint["step"] == total
    assert checkpoint["train_seconds"] == pytest.approx(total * 0.05)
    # steps 1-12 ran at the initial rate while they were timed; OneCycle covers the rest
    assert schedule["last_epoch"] == total - 12 == schedule["total_steps"]
    monkeypatch.undo()
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    fake_clock(monkeypatch, lambda n: 0.05)
    crash_at(monkeypatch, 30, "kill")  # calibrated at step 12, saved by the evaluation due every 1.2 s (24 steps)
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", *args))
    monkeypatch.undo()
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    sized = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert sized["calibrated"] and 24 <= sized["step"] < 30 and 119 <= sized["total_steps"] <= 120
    fake_clock(monkeypatch, lambda n: 0.05)
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert resumed["step"] == resumed["total_steps"] == sized["total_steps"]
    assert resumed["scheduler"]["total_steps"] == sized["scheduler"]["total_steps"]


@pytest.mark.parametrize("later_step_seconds", [0.05, 0.0075])
def test_max_minutes_refits_the_schedule_when_steps_change_pace(tmp_path, monkeypatch, capsys, later_step_seconds):
    """Timed at 0.01 s a step, the schedule plans for about 300 steps in 3 s; then steps take 5× longer (or a
    quarter shorter). Each evaluation (every epoch of 8 steps here) fits the remaining steps into the time left, so the
    run ends on time with OneCycle run to its final rate: not cut off early, nor finished with time to spare."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    fake_clock(monkeypatch, lambda n: 0.01 if n <= 12 else later_step_seconds)
    budget_seconds = 3.0
    train.main(tiny_args(tmp_path, "--epochs", "1000", "--max_minutes", str(budget_seconds / 60)))
    checkpoint, lines = torch.load(tmp_path / "last.pt", weights_only=True), read_metrics(tmp_path)
    schedule = checkpoint["scheduler"]
    assert checkpoint["step"] == checkpoint["total_steps"] == lines[-1]["step"] == 12 + schedule["total_steps"]
    cfg = cpu_config()  # OneCycle ends at its final rate
    assert schedule["last_epoch"] == schedule["total_steps"]
    assert lines[-1]["lr"] == pytest.approx(cfg.lr / cfg.div_factor / cfg.final_div_factor)
    # within 1% of the steps (the noise a refit ignores) of using the whole budget
    assert budget_seconds * 0.99 - later_step_seconds <= checkpoint["train_seconds"] <= budget_seconds
    out = capsys.readouterr().out
    assert "schedule refitted to the time left: 30" in out and "time budget spent" not in out


def test_max_minutes_stops_on_time_when_steps_slow_down_after_the_last_refit(tmp_path, monkeypatch, capsys):
    """Steps of 0.01 s until step 280 of the 300 planned (an evaluation there keeps the plan), then 0.08 s: no
    evaluation comes in time to refit, and the budget runs out at step 283, where the run must stop, evaluate
    and save."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    fake_clock(monkeypatch, lambda n: 0.01 if n <= 280 else 0.08)
    budget_seconds = 3.0
    train.main(tiny_args(tmp_path, "--epochs", "1000", "--max_minutes", str(budget_seconds / 60)))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["step"] == checkpoint["total_steps"] == 283 < 12 + checkpoint["scheduler"]["total_steps"]
    assert budget_seconds <= checkpoint["train_seconds"] < budget_seconds + 0.08
    assert read_metrics(tmp_path)[-1]["step"] == checkpoint["step"]  # the last epoch was evaluated and saved
    assert "time budget spent at step 283 of the 300 planned" in capsys.readouterr().out


def test_max_minutes_sizes_a_short_run_so_it_still_warms_up_and_anneals(tmp_path, monkeypatch):
    """A run planned with fewer steps than the usual timing window (about 21 here) is timed over a
    shorter window, then follows OneCycle to its final rate instead of holding lr / div_factor throughout."""
    fake_clock(monkeypatch, lambda n: 0.01)
    train.main(tiny_args(tmp_path, "--epochs", "3", "--max_minutes", "5"))
    checkpoint, lines = torch.load(tmp_path / "last.pt", weights_only=True), read_metrics(tmp_path)
    assert checkpoint["calibrated"] and checkpoint["step"] == checkpoint["total_steps"] == lines[-1]["step"]
    schedule = checkpoint["scheduler"]
    cfg = cpu_config()
    assert 0 < schedule["last_epoch"] == schedule["total_steps"]
    assert lines[-1]["lr"] == pytest.approx(cfg.lr / cfg.div_factor / cfg.final_div_factor)


def test_max_minutes_sizes_a_run_of_slow_steps_early(tmp_path, monkeypatch):
    """Steps so slow that the usual window would take most of the budget: timing stops after a tenth of it."""
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    fake_clock(monkeypatch, lambda n: 1.0)
    train.main(tiny_args(tmp_path, "--epochs", "1000", "--max_minutes", "0.5"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    # timed from step 2 until 3 s (a tenth of 30 s) had passed, at step 5; then 25 more steps fit
    assert checkpoint["step"] == checkpoint["total_steps"] == 30
    assert checkpoint["scheduler"]["last_epoch"] == 25 == checkpoint["scheduler"]["total_steps"]


def test_max_minutes_spent_by_the_end_of_an_epoch_starts_no_other(tmp_path, monkeypatch, capsys):
    real_epoch = train.train_interval

    def epoch_that_spends_the_budget(trainer, progress, *args):
        result = real_epoch(trainer, progress, *args)
        progress.train_seconds = 60.0
        return result

    monkeypatch.setattr(train, "train_interval", epoch_that_spends_the_budget)
    train.main(tiny_args(tmp_path, "--epochs", "3", "--max_minutes", "1"))
    checkpoint, lines = torch.load(tmp_path / "last.pt", weights_only=True), read_metrics(tmp_path)
    assert len(lines) == 1 and checkpoint["step"] == checkpoint["total_steps"] == lines[0]["step"]
    assert "time budget spent at step" in capsys.readouterr().out


def test_pad_multiple_auto_is_8_on_cuda_and_for_packed_rows_else_1():
    assert runtime.pad_multiple(Config(), torch.device("cpu")) == 8  # packed is the default batching
    assert runtime.pad_multiple(Config(batching="bucketed"), torch.device("cuda")) == 8
    assert runtime.pad_multiple(Config(batching="bucketed"), torch.device("cpu")) == 1
    assert runtime.pad_multiple(Config(batching="random", pad_multiple=4), torch.device("cpu")) == 4


@pytest.mark.parametrize("bf16, fp32, chosen, probed", [
    ((300e9, 413e9), (150e9, 180e9), torch.bfloat16, {256, 1024}),  # AVX512-BF16 on an AMD EPYC: 2.3x fp32
    ((150e9, 166e9), (250e9, 333e9), None, {256, 1024}),  # AVX512-BF16 without AMX on an Intel Xeon: 0.5x
    ((2.5e9, 0.6e9), (20e9, 17e9), None, {256}),  # AVX2 only (an AMD EPYC): 0.04x, told by the small product
])
def test_amp_auto_on_a_cpu_picks_the_precision_its_matrix_products_run_faster_in(monkeypatch, bf16, fp32, chosen,
                                                                                  probed):
    """By measurement, at the size a run's start-up can afford: the large product only where the small one
    leaves the question open (a CPU without bf16 units takes seconds for a large bf16 product)."""
    sizes = {runtime.CPU_SCREEN_SIZE: 0, runtime.CPU_PROBE_SIZE: 1}
    measured, asked = {torch.bfloat16: bf16, None: fp32}, set()

    def peak_flops(device, dtype, size=None):
        asked.add(size)
        return measured[dtype][sizes[size]]

    monkeypatch.setattr(runtime, "peak_flops", peak_flops)
    assert runtime.amp_dtype("auto", torch.device("cpu")) == chosen and asked == probed
    assert runtime.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # an explicit choice stands


@pytest.mark.parametrize("bf16_supported, chosen", [(True, torch.bfloat16), (False, torch.float16)])
def test_amp_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16_supported, chosen):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert runtime.amp_dtype("auto", torch.device("cuda")) == chosen
    assert runtime.amp_dtype("fp16", torch.device("cuda")) == torch.float16  # the user's original recipe stays


def test_fused_adamw_skips_an_update_it_is_told_is_not_finite():
    """What the CUDA step relies on to skip without a host sync: fused AdamW given found_inf = 1 leaves the
    weights, moments and step count as they were, and found_inf = 0 updates as usual."""
    model = make_model()
    optimizer = step.make_optimizer(cpu_config(), model, torch.device("cpu"), 10)[0]
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()["state"])
    for found_inf, moved in ((1.0, False), (0.0, True)):
        optimizer.found_inf = torch.tensor(found_inf)
        optimizer.step()
        del optimizer.found_inf
        assert all(torch.equal(value, model.state_dict()[name]) for name, value in weights.items()) != moved
        assert all(torch.equal(a[key], b[key]) for a, b in zip(state.values(), optimizer.state_dict()["state"].values())
                   for key in a) != moved


def test_evaluations_come_at_their_interval_within_and_across_epochs_and_resume_exactly(tmp_path, monkeypatch):
    """Epochs of 0.4 s (8 steps of 0.051 s), evaluated every 0.6 s of training (12 steps; off the boundary, where the sums of two clocks' readings may round either way): in the middle of
    epoch 2, at the end of epoch 3, and so on, each metrics line covering the steps since the last, and each
    evaluation saving last.pt. A stop in between saves the sums since the last evaluation."""
    args = ("--epochs", "6", "--eval_every_minutes", "0.01", "--dropout", "0.2")
    fake_clock(monkeypatch, lambda n: 0.051)
    train.main(tiny_args(tmp_path / "straight", *args))
    straight = read_metrics(tmp_path / "straight")
    assert [(line["step"], line["epoch"]) for line in straight] == [(12, 1.5), (24, 3), (36, 4.5), (48, 6)]
    steps = [0] + [line["step"] for line in straight]
    assert [line["epoch_seconds"] for line in straight] == pytest.approx([0.051 * (b - a) for a, b in zip(steps,
                                                                                                      steps[1:])])
    crash_at(monkeypatch, 30, "sigterm")  # in epoch 4, 6 steps after the evaluation at the end of epoch 3
    with pytest.raises(SystemExit):
        train.main(tiny_args(tmp_path / "resumed", *args))
    monkeypatch.undo()
    fake_clock(monkeypatch, lambda n: 0.051)
    train.main(tiny_args(tmp_path / "resumed", *args, "--resume", "auto"))
    resumed = read_metrics(tmp_path / "resumed")
    assert [line["epoch"] for line in resumed] == [1.5, 3, 4.5, 6]
    assert [a["epoch_seconds"] for a in straight] == pytest.approx([b["epoch_seconds"] for b in resumed])
    assert_same_training(tmp_path / "straight", tmp_path / "resumed")


def test_epochs_auto_means_ten_or_as_many_as_the_time_budget_allows(tmp_path, monkeypatch):
    fake_clock(monkeypatch, lambda n: 0.05)
    train.main(tiny_args(tmp_path / "epochs"))
    assert read_metrics(tmp_path / "epochs")[-1]["epoch"] == budget.DEFAULT_EPOCHS
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", (2, 12))
    train.main(tiny_args(tmp_path / "budget", "--max_minutes", "0.1"))  # 6 s hold 120 steps of 0.05 s
    checkpoint = torch.load(tmp_path / "budget" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] > budget.DEFAULT_EPOCHS and 119 <= checkpoint["step"] == checkpoint["total_steps"] <= 120


def test_a_resumed_run_keeps_the_batches_and_rate_its_autos_resolved_to(tmp_path, monkeypatch):
    """Begun with a fixed batch shape, a token budget and a peak rate (CUDA's autos, written out here), stopped,
    then resumed with every one of them left at auto, as on another device: it must go on exactly as begun."""
    begun = ("--epochs", "2", "--max_tokens", "700", "--batch_shape", "fixed", "--lr", "1e-3", "--dropout", "0.2")
    train.main(tiny_args(tmp_path / "straight", *begun))
    crash_at(monkeypatch, read_metrics(tmp_path / "straight")[0]["step"] + 2, "kill")  # in epoch 2
    with pytest.raises(Crash):
        train.main(tiny_args(tmp_path / "resumed", *begun))
    monkeypatch.undo()
    autos = ("--max_tokens", "-1", "--batch_shape", "auto", "--lr", "0", "--epochs", "0", "--resume", "auto")
    train.main(tiny_args(tmp_path / "resumed", "--dropout", "0.2", *autos))
    saved = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["config"]
    assert (saved["max_tokens"], saved["batch_shape"], saved["lr"], saved["epochs"]) == (700, "fixed", 1e-3, 2)
    assert_same_training(tmp_path / "straight", tmp_path / "resumed", names=("train_loss",))


def test_one_loader_serves_every_epoch_of_a_run(tmp_path, monkeypatch):
    """At GPU speed an epoch can take less time than starting loader processes: they start once per run."""
    real_loader, training_loaders = batching.make_loader, []

    def make_loader(*args, **kwargs):
        training_loaders.extend([1] if kwargs.get("batches", args[5] if len(args) > 5 else None) else [])
        return real_loader(*args, **kwargs)

    monkeypatch.setattr(batching, "make_loader", make_loader)
    train.main(tiny_args(tmp_path, "--epochs", "3", "--num_workers", "1"))
    assert len(read_metrics(tmp_path)) == 3 and len(training_loaders) == 1


def test_every_number_a_captured_step_bakes_in_stays_constant_over_the_run():
    """A CUDA graph records each optimizer hyperparameter as the value it had when captured, except the rate,
    which it reads from a device tensor: every other group option (betas above all, which OneCycle cycles when
    --cycle_momentum is true) must not change during a run on the default path, and a config that would change
    them is kept off the graph."""
    cfg = cpu_config(data_files=[conftest.FIXTURE], d_model=32, n_heads=2, d_ff=64, n_layers=2, n_unique_layers=1,
                     max_tokens=600, batching="packed", batch_shape="fixed")
    data = dataset.prepare_data(cfg, log=lambda message: None)
    trainer, _ = train.build_trainer(cfg, data, None, 0, 1, Precision(torch.device("cpu")), lambda message: None)
    collate = batching.make_collate(data.ids["pad"], 8, shape=trainer.sampler.shape)
    batches = [collate([data.train[i] for i in indices]) for indices in trainer.sampler] * 3
    baked_in = []
    for _ in train.training_steps(trainer, batches):
        baked_in.append([{k: v for k, v in group.items() if k not in ("params", "lr")}
                         for group in trainer.optimizer.param_groups])
    assert len(baked_in) > 10 and all(options == baked_in[0] for options in baked_in)
    assert trainer.optimizer.param_groups[0]["lr"] != cfg.lr / cfg.div_factor  # the rate did move
    momentum = dataclasses.replace(cfg, cycle_momentum=True)
    assert "--cycle_momentum true" in runtime.graph_obstacle(momentum, torch.device("cuda"), torch.bfloat16, 1)
    assert runtime.graph_obstacle(cfg, torch.device("cuda"), torch.bfloat16, 1) is None


def test_the_start_up_log_lists_what_each_auto_became(tmp_path, capsys):
    train.main(tiny_args(tmp_path, "--max_steps", "2", "--epochs", "1"))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("autos: ")]
    taken = dict(item.split(" ") for item in line.removeprefix("autos: ").split(", "))
    # tiny_args sets max_tokens and the model; --epochs is given here: neither is an auto of this run
    assert taken == {"batch_shape": "varied", "lr": "0.001", "dropout": "0", "tokenizer": "word",
                     "tie_embeddings": "False", "pad_multiple": "8", "num_workers": "0", "eval_every_minutes": "10"}
