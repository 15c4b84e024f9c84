"""Every user mistake or environmental fault ends in one line on stderr, a non-zero exit and no traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import batching
import checkpoint
import dataset
import runtime
import step
import train
from config import Config
from conftest import FIXTURE, ROOT, run_script, tiny_args
from conftest import read_metrics


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_data_file_that_is_not_utf8_names_its_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"translation": {"en": "Hi.", "fr": "Salut."}}\n' * 3 + b"\xff\xfe bad bytes\n")
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--data_files", str(latin)),
                          "latin.jsonl:4: not UTF-8", "convert the file to UTF-8")


def test_byte_order_mark_and_windows_line_endings_are_accepted(tmp_path):
    rows = ['{"translation": {"en": "Hello.", "fr": "Bonjour."}}', '{"translation": {"en": "Thanks.", "fr": "Merci."}}']
    jsonl, tsv = tmp_path / "bom.jsonl", tmp_path / "bom.tsv"
    jsonl.write_bytes("\ufeff".encode() + "\r\n".join(rows).encode() + b"\r\n")
    tsv.write_bytes("\ufeffHello.\tBonjour.\r\nThanks.\tMerci.\r\n".encode())
    for path in (jsonl, tsv):
        assert dataset.read_pairs([str(path)], "en", "fr") == ([("Hello.", "Bonjour."), ("Thanks.", "Merci.")], 0)


def test_bad_paths_give_one_line(tmp_path):
    a_file, a_directory = tmp_path / "file", tmp_path / "pairs.jsonl"
    a_file.write_text("not a directory")
    a_directory.mkdir()
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--data_files", str(a_directory)),
                          "pairs.jsonl is a directory")
    assert_one_line_error(run_script("train.py", *tiny_args(a_file)), f"cannot use --run_dir {a_file}")


def test_a_checkpoint_that_is_not_ours_or_carries_pickled_code_is_refused(tmp_path):
    foreign, pickled = str(tmp_path / "foreign.pt"), str(tmp_path / "pickled.pt")
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    torch.save({"model": {}, "config": {}, "tokenizers": [], "payload": subprocess.Popen}, pickled)
    for path, message in [(foreign, "is not a checkpoint written by train.py (it lacks model, config, tokenizers)"),
                          (pickled, "holds pickled Python objects")]:
        assert_one_line_error(run_script("translate.py", "--checkpoint", path, "Hello."), message)
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--resume", foreign), "foreign.pt")


def test_eval_file_with_a_missing_reference_names_its_line(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"translation": {"en": "Hi.", "fr": "Salut."}}\n{"translation": {"en": "Go."}}\n')
    assert_one_line_error(run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(pairs)),
                          "pairs.jsonl:2: needs a non-empty 'en' source and 'fr' reference")


def test_too_long_input_lines_are_cut_and_named_and_every_line_is_kept(checkpoint):
    long_line = " ".join(["word"] * 3000)
    result = run_script("translate.py", "--checkpoint", checkpoint, "--device", "cpu",
                        stdin=f"Hello.\n{long_line}\nGo.\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert len(result.stdout.split("\n")) == 4  # three translations and the final newline
    [warning] = result.stderr.strip().splitlines()
    assert "input line 2 has 3000 tokens" in warning and "translated its first 1023 tokens" in warning


def test_stdin_that_is_not_utf8_names_its_line(checkpoint):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "translate.py"), "--checkpoint", checkpoint],
                            input=b"Hello.\n\xff bad\n", capture_output=True, timeout=120)
    result = subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())
    assert_one_line_error(result, "standard input line 2 is not UTF-8")


def test_a_live_run_locks_its_run_dir_until_it_dies(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *tiny_args(run_dir, "--epochs", "1000")],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while not first.stdout.readline().startswith("train:"):  # it holds the lock and is training
            assert first.poll() is None
        assert_one_line_error(run_script("train.py", *tiny_args(run_dir, "--epochs", "1")),
                              f"--run_dir {run_dir} is in use by another running train.py")
        first.kill()  # kill -9: no clean-up runs, the OS drops the lock
        first.wait()
        result = run_script("train.py", *tiny_args(run_dir, "--epochs", "1", "--overwrite", "true"))
        assert result.returncode == 0, result.stderr
    finally:
        first.kill()
        first.stdout.close()


def test_resuming_on_changed_data_is_refused(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(open(FIXTURE).read())
    args = tiny_args(tmp_path / "run", "--epochs", "2", "--max_steps", "3")
    args[args.index(FIXTURE)] = str(data)
    train.main(args)
    data.write_text(open(FIXTURE).read().replace("Tom", "Tim"))
    with pytest.raises(SystemExit, match=r"the data has changed since .*last.pt was written"):
        train.main([*args, "--resume", "auto"])


def test_a_validation_split_the_model_cannot_take_is_refused_before_training(tmp_path):
    short, long = ('{"translation": {"en": "a b c", "fr": "x y z"}}', '{"translation": {"en": "a b", "fr": "%s"}}'
                   % " ".join(["w"] * 12))
    pairs = dataset.split_pairs(list(range(40)), 0.05, 42)[1]  # the indices the split puts in validation
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(long if i in pairs else short for i in range(40)) + "\n")
    result = run_script("train.py", "--data_files", str(data), "--run_dir", str(tmp_path / "run"), "--device", "cpu",
                        "--val_fraction", "0.05", "--max_src_tokens", "5", "--max_len_ratio", "1",
                        "--max_len_diff", "2", "--max_positions", "8")
    assert_one_line_error(result, "none of the 2 validation pairs fits the model (--max_positions 8")
    assert "train:" not in result.stdout


def test_a_vocabulary_of_special_tokens_only_is_refused(tmp_path):
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--min_frequency", "100000"),
                          "the en vocabulary holds only the special tokens", "lower --min_frequency")


def test_ctrl_c_during_set_up_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "train_tokenizers", interrupted)
    with pytest.raises(SystemExit, match="interrupted during set-up.*nothing was saved"):
        train.main(tiny_args(tmp_path))
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda *args: interrupted())
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({}, str(tmp_path / "last.pt"))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_best_pt_is_made_good_when_a_stop_came_before_its_copy(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stopped(*args):
        raise Stop

    monkeypatch.setattr(checkpoint, "copy_atomic", stopped)  # killed after last.pt, before best.pt
    with pytest.raises(Stop):
        train.main(tiny_args(tmp_path, "--epochs", "2"))
    monkeypatch.undo()
    assert not (tmp_path / "best.pt").exists()
    epoch_1 = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    real_step = step.train_step
    monkeypatch.setattr(step, "train_step", lambda *args, **kwargs: stopped())  # and killed again at once
    with pytest.raises(Stop):
        train.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "auto"))
    assert checkpoint.saved_step(str(tmp_path / "best.pt")) == epoch_1
    monkeypatch.setattr(step, "train_step", real_step)
    train.main(tiny_args(tmp_path, "--epochs", "2", "--resume", "auto"))
    assert checkpoint.saved_step(str(tmp_path / "best.pt")) in {line["step"] for line in read_metrics(tmp_path)}


def test_a_finished_run_resumed_into_a_new_run_dir_leaves_its_checkpoints_there(tmp_path):
    train.main(tiny_args(tmp_path / "old", "--epochs", "1"))
    result = run_script("train.py", *tiny_args(tmp_path / "new", "--epochs", "1", "--resume",
                                               str(tmp_path / "old" / "best.pt")))
    assert result.returncode == 0, result.stderr
    done = result.stdout.strip().splitlines()[-1]
    assert done.startswith(f"done: translate with {tmp_path / 'new' / 'last.pt'}")
    for name in ("last.pt", "best.pt"):
        assert checkpoint.saved_step(str(tmp_path / "new" / name)) == checkpoint.saved_step(
            str(tmp_path / "old" / "best.pt"))


def test_resume_naming_a_directory_says_so(tmp_path):
    assert_one_line_error(run_script("train.py", *tiny_args(tmp_path / "run"), "--resume", str(tmp_path)),
                          f"{tmp_path} is a directory; name a checkpoint file in it")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(tokenizers=["{broken", c["tokenizers"][1]]), "its tokenizers are not the JSON"),
    (lambda c: c["config"].pop("tokenizer"), "its config lacks tokenizer"),
    (lambda c: c["config"].update(n_heads=3), "its config is not valid (--n_heads must divide --d_model"),
    (lambda c: c["config"].update(d_model=64), "(the model its config describes); the checkpoint was edited"),
])
def test_a_hand_edited_checkpoint_is_one_line(checkpoint, tmp_path, edit, message):
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "edited.pt")
    assert_one_line_error(run_script("translate.py", "--checkpoint", str(tmp_path / "edited.pt"), "Hello."), message)


@pytest.mark.parametrize("flags, message", [
    (["--max_len_a=-1"], "--max_len_a must be from 0 to 65,536 (got -1.0)"),
    (["--length_penalty", "nan", "--beam", "4"], "--length_penalty must be"),
])
def test_translate_refuses_length_options_that_would_empty_its_output(checkpoint, flags, message):
    assert_one_line_error(run_script("translate.py", "--checkpoint", checkpoint, *flags, "Hello."), message)


def test_eval_warnings_name_the_file_and_line(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    long_source = " ".join(["word"] * 1100)
    pairs.write_text('{"translation": {"en": "Hi.", "fr": "Salut."}}\n\n'
                     f'{{"translation": {{"en": "{long_source}", "fr": "Mot."}}}}\n')
    result = run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(pairs), "--max_len", "3")
    assert result.returncode == 0, result.stderr
    [warning] = result.stderr.strip().splitlines()
    assert f"{pairs}:3 has 1100 tokens" in warning


# train.py whose third step fails with an error no code path expects, as a CUDA error or out-of-memory would
FAILING_STEP = """
import sys
import time
sys.path.insert(0, {root!r})
import step, train
real_step, calls = step.train_step, []

def failing_step(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("injected failure in the training step")
    return real_step(*args, **kwargs)

step.train_step = failing_step
train.main(sys.argv[1:])
"""


def test_an_unexpected_error_with_loader_workers_running_ends_the_process_at_once(tmp_path):
    """Loader workers ignore SIGTERM (the main process decides when to stop), so the interpreter's exit cannot
    terminate them: the loader must shut them down itself, or the failed run hangs instead of exiting."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", FAILING_STEP.format(root=ROOT),
                             *tiny_args(tmp_path, "--epochs", "2", "--num_workers", "2")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0 and "RuntimeError: injected failure in the training step" in result.stderr
    assert time.monotonic() - started < 30


def test_resume_takes_the_same_data_file_under_another_spelling_and_repeated_flags_add_files(tmp_path, monkeypatch):
    """med.jsonl, ./med.jsonl and its absolute path are one file: the content fingerprint guards what it holds."""
    monkeypatch.chdir(ROOT)
    relative = os.path.relpath(FIXTURE, ROOT)
    args = ["--run_dir", str(tmp_path), *tiny_args(tmp_path)[4:], "--epochs", "2", "--max_steps", "3"]
    train.main(["--data_files", relative, *args])
    train.main(["--data_files", "./" + relative, *args, "--resume", "auto"])
    train.main(["--data_files", FIXTURE, *args, "--resume", "auto"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    from config import Config
    assert Config.from_args(["--data_files", "a.jsonl", "--data_files", "b.jsonl"]).data_files == ["a.jsonl",
                                                                                                  "b.jsonl"]


def test_a_time_budget_on_a_run_shorter_than_its_timing_window_ends_the_run(tmp_path):
    """--max_minutes on 2 steps in all: the timed steps are the whole run, and no empty schedule is made."""
    train.main(tiny_args(tmp_path, "--max_minutes", "5", "--epochs", "1", "--max_tokens", "0", "--batch_size", "200"))
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=True)
    assert checkpoint["step"] == checkpoint["total_steps"] == 2 and checkpoint["calibrated"]


@pytest.mark.parametrize("flags, message", [
    (["--length_penalty", "1e300", "--beam", "2"], "--length_penalty must be from 0 to 10"),
    (["--beam", "100000"], "--beam must be from 1 to 128 (got 100,000)"),
])
def test_translate_refuses_options_beyond_their_bounds(checkpoint, flags, message):
    assert_one_line_error(run_script("translate.py", "--checkpoint", checkpoint, *flags, "Hello."), message)


def test_translate_into_a_closed_pipe_exits_quietly(checkpoint):
    """`translate.py ... | head -1`: the reader leaves after one line; the rest of the output has nowhere to go.
    The output (about 130 KB) is larger than a pipe's buffer (64 KB), so it cannot all be written before head leaves."""
    lines = "\n".join(["I am tired.", "Where is the station?"] * 6000) + "\n"
    shell = f"{sys.executable} translate.py --checkpoint {checkpoint} --max_len 2 | head -1; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", shell], input=lines, capture_output=True, text=True, cwd=ROOT)
    assert len(result.stdout.splitlines()) == 1 and result.stderr == "" and result.returncode == 141


@pytest.mark.parametrize("inputs", [["Hello."], ["--eval", FIXTURE]])
def test_translate_onto_a_full_device_or_a_closed_stdout_is_one_line(checkpoint, inputs):
    command = f"{sys.executable} translate.py --checkpoint {checkpoint} {' '.join(inputs)}"
    full = subprocess.run(["bash", "-c", command + " > /dev/full"], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(full, "error: could not write to standard output: No space left on device")
    closed = subprocess.run(["bash", "-c", command + " >&-"], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(closed, "error: standard output is closed")


def test_a_lone_surrogate_escape_in_the_data_names_its_line(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"translation": {"en": "Hi.", "fr": "Salut."}}\n'
                     '{"translation": {"en": "A \\ud800 here.", "fr": "Un ici."}}\n')
    for result in (run_script("train.py", *tiny_args(tmp_path / "run"), "--data_files", str(pairs)),
                   run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(pairs))):
        assert_one_line_error(result, f"{pairs}:2: holds a lone surrogate escape")


def test_an_argument_that_is_not_utf8_is_one_line(checkpoint):
    result = subprocess.run([sys.executable.encode(), b"translate.py", b"--checkpoint", checkpoint.encode(),
                             b"Hello.", b"caf\xe9"], capture_output=True, text=True, cwd=ROOT)
    assert_one_line_error(result, "argument 2 is not UTF-8 text")


@pytest.mark.parametrize("name, content, message", [
    ("eval.txt", "Hello.\tBonjour.\n", "eval.txt: expected a .jsonl, .json, .tsv, .parquet file"),
    ("array.json", '[{"translation": {"en": "Hi.", "fr": "Salut."}}, {"translation": {"en": 3}}]',
     "array.json item 2: needs a non-empty 'en' source"),
])
def test_eval_files_are_read_by_their_kind(checkpoint, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    assert_one_line_error(run_script("translate.py", "--checkpoint", checkpoint, "--eval", str(tmp_path / name)),
                          message)


def test_translate_on_a_directory_names_no_flag_it_lacks(checkpoint, tmp_path):
    result = run_script("translate.py", "--checkpoint", str(tmp_path))
    assert_one_line_error(result, f"{tmp_path} is a directory; name a checkpoint file in it")
    assert "--resume" not in result.stderr


def test_a_checkpoint_config_edited_to_a_huge_model_is_caught_before_any_allocation(checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    state["config"].update(d_model=16384, d_ff=65536, n_heads=2, n_layers=1024, n_unique_layers=1024)
    torch.save(state, tmp_path / "huge.pt")
    result = run_script("translate.py", "--checkpoint", str(tmp_path / "huge.pt"), "Hello.")
    assert_one_line_error(result, "model[src_embed.weight] is a float32 tensor of shape ",
                          "x32, not a tensor of shape ", "x16384 (the model its config describes)")


def test_start_up_does_not_grow_with_the_epochs_a_run_will_not_reach(tmp_path, monkeypatch):
    """--epochs 2000 --max_steps 5 plans one epoch's batches, not 2000; --epochs 100000 plans COUNTED_EPOCHS."""
    planned = []
    real_make = batching.BatchSampler._make_batches

    def make_batches(self, epoch):
        planned.append(epoch)
        return real_make(self, epoch)

    monkeypatch.setattr(batching.BatchSampler, "_make_batches", make_batches)
    train.main(tiny_args(tmp_path / "a", "--epochs", "2000", "--max_steps", "5"))
    assert len(planned) <= 3  # counting epoch 0, then the loader's epoch 0 and the plan ahead of epoch 1
    planned.clear()
    trainer, progress = train.build_trainer(*trainer_inputs(tmp_path / "b", "--epochs", "100000"))
    assert len(set(planned)) == train.COUNTED_EPOCHS
    assert progress.total_steps == pytest.approx(100000 * len(trainer.sampler), rel=0.01)


def trainer_inputs(run_dir, *flags):
    cfg = runtime.resolve_autos(Config.from_args(tiny_args(run_dir, *flags)), torch.device("cpu"))
    data = dataset.prepare_data(cfg, log=lambda message: None)
    return cfg, data, None, 0, 1, runtime.Precision(torch.device("cpu")), lambda message: None


def test_a_step_that_fails_after_a_stop_signal_stops_the_run_as_the_signal_does(tmp_path, nth_call):
    """A stop signal kills torch.compile's C++ build in child processes, and the step then raises: the run
    saves the state of before that step and exits as for the signal, not with the compiler's traceback."""
    def killed_in_its_build():
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("InductorError: C++ compile error (the compiler was killed)")

    nth_call(step, "train_step", 5, before=killed_in_its_build)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tmp_path, "--epochs", "2"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert checkpoint.saved_step(str(tmp_path / "last.pt")) == 4
