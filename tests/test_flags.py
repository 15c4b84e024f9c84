"""Every flag at its extremes: each numeric flag of train.py, translate.py and bench.py, and each string, choice and
path flag of train.py, is tried at and past its bounds; a bad value is one line on stderr starting `error:`, a
non-zero exit, no traceback, and nothing written to the run directory. Validation only: nothing trains."""
import dataclasses
import math
import os
import typing

import pytest

import bench
import config
import train
import translate
from config import Config

NUMERIC_FIELDS = [f for f in dataclasses.fields(Config) if typing.get_type_hints(Config)[f.name] in (int, float)]
NOT_UTF8 = os.fsdecode(b"caf\xe9.jsonl")  # bytes that are not UTF-8 reach argv as lone surrogates
HUGE = 10 ** 23


def failure(main, argv, capsys):
    """(exit code, stderr) of main(argv) run in this process; a message a script exits with counts as stderr, as
    the interpreter would print it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return code, err


def assert_one_line(code, err, flag=None):
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert flag is None or f"--{flag}" in lines[0], err


def edge_values(kind, low, high):
    """(values at the bounds or harmless, values past them) as command-line text."""
    if kind is int:
        inside = [low, high, 0] if low <= 0 <= high else [low, high]
        return [str(v) for v in inside], [str(v) for v in {low - 1, high + 1, -1 if low >= 0 else None, HUGE, -HUGE}
                                          if v is not None and not low <= v <= high]
    inside = [low, high] + ([0.0] if low <= 0 <= high else [])
    past = [math.nextafter(low, -math.inf), math.nextafter(high, math.inf), HUGE, -HUGE, -1.0 if low >= 0 else None]
    return ([repr(float(v)) for v in inside],
            [repr(float(v)) for v in past if v is not None and not low <= v <= high] + ["nan", "inf", "-inf"])


def test_every_numeric_field_has_bounds():
    """A field added without them fails here, so no numeric flag reaches a library unchecked."""
    unbounded = [f.name for f in NUMERIC_FIELDS if f.metadata["bounds"] is None]
    assert not unbounded, f"give these fields bounds=(low, high) in config.py: {unbounded}"
    for script in (translate, bench):
        numeric = {action.dest for action in script.build_parser()._actions if action.type in (int, float)}
        assert numeric == set(script.FLAG_BOUNDS), script.__name__


@pytest.mark.parametrize("field", NUMERIC_FIELDS, ids=lambda f: f.name)
def test_every_numeric_flag_at_and_past_its_bounds(field, tmp_path, capsys):
    kind = typing.get_type_hints(Config)[field.name]
    inside, past = edge_values(kind, *field.metadata["bounds"])
    run_dir = tmp_path / "run"
    for value in inside:  # valid, or refused in one line by a rule that ties it to another flag
        try:
            Config.from_args(["--run_dir", str(run_dir), f"--{field.name}={value}"])
        except SystemExit as error:
            assert_one_line(error.code, capsys.readouterr().err)
    for value in past:
        code, err = failure(train.main, ["--run_dir", str(run_dir), f"--{field.name}={value}"], capsys)
        assert_one_line(code, err, field.name)
        assert "from" in err or "finite" in err or "invalid" in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("script", [translate, bench], ids=lambda script: script.__name__)
def test_the_scripts_numeric_flags_at_and_past_their_bounds(script, tmp_path, capsys):
    base = ["--checkpoint", str(tmp_path / "missing.pt")] if script is translate else []
    kinds = {action.dest: action.type for action in script.build_parser()._actions}
    for name, bounds in script.FLAG_BOUNDS.items():
        inside, past = edge_values(kinds[name], *bounds)
        for value in inside:  # passes the bounds, then stops at the missing checkpoint or data files
            code, err = failure(script.main, base + [f"--{name}={value}"], capsys)
            assert_one_line(code, err)
            assert f"--{name}" not in err, err
        for value in past:
            assert_one_line(*failure(script.main, base + [f"--{name}={value}"], capsys), name)


def test_a_huge_min_frequency_is_one_line_naming_its_range(capsys):
    """The command of issue 43: tokenizers takes the count as a u64 and raised OverflowError after the data loaded."""
    code, err = failure(train.main, ["--min_frequency", str(HUGE), "--data_files", "tests/fixtures/pairs.jsonl"],
                        capsys)
    assert_one_line(code, err, "min_frequency")
    assert "from 1 to 4,294,967,295" in err


def string_cases(tmp_path):
    """(field, value, refused) for empty, very long, a directory, a path that does not exist and a name that is
    not UTF-8: what train.py must refuse in one line, and what it takes (a run directory that does not exist yet
    is made; --resume "" is a fresh run)."""
    directory, long = str(tmp_path), "x" * 5000
    jsonl_directory = tmp_path / "pairs.jsonl"
    jsonl_directory.mkdir()
    cases = []
    for name in ("dataset", "lang_src", "lang_tgt", "tokenizer", "share", "amp", "device", "batching", "batch_shape",
                 "anneal_strategy"):
        cases += [(name, value, True) for value in ("", long, directory, "no/such/thing", NOT_UTF8)]
    for name in ("data_files", "eval_files"):
        cases += [(name, value, True) for value in ("", long + ".jsonl", directory, str(jsonl_directory),
                                                    str(tmp_path / "missing.jsonl"), NOT_UTF8)]
    cases += [("run_dir", value, True) for value in ("", long, NOT_UTF8, "tests/fixtures/pairs.jsonl")]
    cases += [("run_dir", value, False) for value in (directory, str(tmp_path / "new" / "run"))]
    cases += [("resume", value, True) for value in (long, directory, str(tmp_path / "missing.pt"), NOT_UTF8)]
    cases += [("resume", "", False)]
    return cases


def test_every_string_choice_and_path_flag_at_its_extremes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "run"
    for field, value, refused in string_cases(tmp_path):
        argv = ["--run_dir", str(run_dir), "--data_files", "tests/fixtures/pairs.jsonl", f"--{field}", value]
        if not refused:
            Config.from_args(argv)
            continue
        code, err = failure(train.main, argv, capsys)
        assert_one_line(code, err)
        assert len(err) < 6000 and (f"--{field}" in err or field in ("data_files", "eval_files", "resume")), err
        assert not run_dir.exists(), (field, value)
    assert config.shown("x" * 5000).endswith("(5,002 characters)")


def test_the_scripts_path_flags_at_their_extremes(tmp_path, checkpoint, capsys):
    """translate.py's and bench.py's path and name flags: empty, very long, a directory, missing, not UTF-8."""
    extremes = ["", "x" * 5000 + ".jsonl", str(tmp_path), str(tmp_path / "missing.jsonl"), NOT_UTF8]
    for value in extremes:
        for argv in (["--checkpoint", value], ["--engine", "ctranslate2", "--model", value],
                     ["--checkpoint", checkpoint, "--eval", value]):
            assert_one_line(*failure(translate.main, argv, capsys))
        for argv in (["--decode_checkpoint", value], ["--decode_checkpoint", checkpoint, "--decode_file", value]):
            assert_one_line(*failure(bench.main, ["--data_files", "tests/fixtures/pairs.jsonl", *argv], capsys))
