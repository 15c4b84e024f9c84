"""What is read back from disk is input too: every field of a checkpoint, of translator.json and of an exported
model's config.json, set to a wrong type, a negative, a huge number, NaN or left out, and then resumed from,
translated with and exported. Each run ends in one `error:` line naming the field, a non-zero exit and no
traceback. The run directory is left untouched, and no data is prepared first. Fields that translating does not
read may be left out of a checkpoint, as a best.pt stripped for serving would be."""
import json
import math
import shutil

import pytest
import torch

import checkpoint as ckpt
import dataset
import export
import schema
import train
import translate
from config import Config
from conftest import FIXTURE, one_line_failure, tiny_args, tree

pytest.importorskip("ctranslate2", reason="CTranslate2 is not installed (pip install ctranslate2)")

RUN = ["--epochs", "1", "--max_steps", "4"]  # the finished run every case edits, resumed with the same flags
FIELDS = list(schema.CHECKPOINT_FIELDS)  # test_every_field_train_py_writes_is_checked: every field a checkpoint has
TEXT_FIELDS = {"data_fingerprint", "eval_fingerprint"}
LEGACY_OPTIONAL = {"data_fingerprint", "eval_fingerprint"}  # checkpoints from before them still resume
MISSING = object()
VARIANTS = {"wrong type": None, "negative": -5, "huge": 10 ** 30, "NaN": math.nan, "missing": MISSING}
COMMANDS = ("resume", "translate", "export")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("schema") / "run"
    train.main(tiny_args(run_dir, *RUN))
    return run_dir


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "model"
    export.export(str(finished_run / "last.pt"), str(out))
    return out


def edited(value, variant, text=False):
    if variant == "wrong type":
        return 7 if text else "x"
    return VARIANTS[variant]


def set_field(state, name, value):
    if value is MISSING:
        del state[name]
    else:
        state[name] = value


def run(command, path, tmp_path, run_dir):
    """The command's main on checkpoint `path` (for resume: run_dir's last.pt)."""
    if command == "resume":
        return train.main, tiny_args(run_dir, *RUN, "--resume", "auto")
    if command == "translate":
        return translate.main, ["--checkpoint", str(path), "--device", "cpu", "Hello."]
    return export.main, ["--checkpoint", str(path), "--out", str(tmp_path / "out")]


def test_every_field_train_py_writes_is_checked(finished_run):
    assert set(torch.load(finished_run / "last.pt", weights_only=True)) == set(schema.CHECKPOINT_FIELDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("field", FIELDS)
def test_every_checkpoint_field_is_checked_on_load(finished_run, tmp_path, monkeypatch, capsys, field, variant,
                                                   command):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    set_field(state, field, edited(state[field], variant, field in TEXT_FIELDS))
    torch.save(state, run_dir / "last.pt")
    before = tree(run_dir)
    main, argv = run(command, run_dir / "last.pt", tmp_path, run_dir)
    loads = variant == "missing" and (field in LEGACY_OPTIONAL if command == "resume"
                                      else field not in ckpt.CHECKPOINT_KEYS)
    if loads:
        main(argv)
        assert command == "resume" or (command == "export") == (tmp_path / "out").is_dir()
        return
    monkeypatch.setattr(dataset, "prepare_shared_data", lambda *args: pytest.fail("data prepared before the check"))
    error = one_line_failure(main, argv, capsys)
    assert field in error and (tmp_path / "out").exists() is False
    assert tree(run_dir) == before


@pytest.mark.parametrize("name", [name for name in Config.__dataclass_fields__])
def test_every_config_field_of_a_checkpoint_keeps_its_type(finished_run, tmp_path, capsys, name):
    state = torch.load(finished_run / "last.pt", weights_only=True)
    value = state["config"][name]
    wrong = {bool: 1, int: float(value) if type(value) is int else None, float: "x", str: 7, list: "x"}[type(value)]
    state["config"][name] = wrong
    torch.save(state, tmp_path / "edited.pt")
    error = one_line_failure(translate.main, ["--checkpoint", str(tmp_path / "edited.pt"), "Hello."], capsys)
    assert f"its config is not valid (--{name} is {wrong!r}, not " in error


@pytest.mark.parametrize("edit, command, message", [
    (lambda state: state.update(step="x"), "resume", "step is 'x', not a whole number from 0 to "),
    (lambda state: state.update(step=-5), "resume", "step is -5, not a whole number from 0 to "),
    (lambda state: state["config"].update(d_model=32.0), "translate", "--d_model is 32.0, not a whole number"),
    (lambda state: state["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "resume",
     "optimizer.state[0].exp_avg is a float32 tensor of shape 3, not a tensor of shape "),
    (lambda state: state["ranks"][0]["partial"].pop("loss"), "resume",
     "ranks[0].partial is a dict of 5 entries, not a dict holding loss"),
    (lambda state: state["history"][0].update(step=99), "translate", "history[0].step is 99, not a step already "
                                                                     "taken (the checkpoint is at step 4)"),
    (lambda state: state["scheduler"].update(last_epoch=10 ** 6), "resume", "scheduler.last_epoch is 1000000, not"),
    (lambda state: state["config"].update(decay_norms_and_biases=True), "resume", "not 1 parameter group(s)"),
])
def test_a_field_inside_a_field_is_named_in_full(finished_run, tmp_path, capsys, edit, command, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, run_dir / "last.pt")
    main, argv = run(command, run_dir / "last.pt", tmp_path, run_dir)
    error = one_line_failure(main, argv, capsys)
    assert message in error and error.rstrip().endswith("the checkpoint was edited or is damaged"), error


SETTINGS = ["tokenizer", "max_len_a", "max_len_b", "max_positions", "lang_src", "lang_tgt", "quantization",
            "checkpoint"]
ENGINE_CONFIG = ["add_source_bos", "add_source_eos", "bos_token", "decoder_start_token", "eos_token", "unk_token",
                 "layer_norm_epsilon"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("file, field", [("translator.json", name) for name in SETTINGS]
                         + [("config.json", name) for name in ENGINE_CONFIG])
def test_every_field_of_an_exported_model_is_checked_on_load(exported, tmp_path, capsys, file, field, variant):
    directory = tmp_path / "model"
    shutil.copytree(exported, directory)
    stored = json.loads((directory / file).read_text())
    assert field in stored
    set_field(stored, field, edited(stored[field], variant, isinstance(stored[field], str)))
    (directory / file).write_text(json.dumps(stored))
    before = tree(directory)
    error = one_line_failure(translate.main, ["--engine", "ctranslate2", "--model", str(directory), "Hello."], capsys)
    assert f"{file} {field}" in error or f"a dict holding {field}" in error, error
    assert error.rstrip().endswith("the directory was edited or is damaged") and tree(directory) == before


def test_bench_checks_its_decode_checkpoint_before_it_trains(finished_run, tmp_path, monkeypatch, capsys):
    import bench
    state = torch.load(finished_run / "last.pt", weights_only=True)
    state["config"]["d_model"] = 32.0
    torch.save(state, tmp_path / "edited.pt")
    monkeypatch.setattr(dataset, "prepare_data", lambda *args, **kwargs: pytest.fail("data prepared before the check"))
    error = one_line_failure(bench.main, ["--data_files", FIXTURE, "--decode_checkpoint", str(tmp_path / "edited.pt")],
                             capsys)
    assert "--d_model is 32.0, not a whole number" in error
