import dataclasses

import pytest
import torch

import config
from config import Config
from runtime import resolve_autos


def test_the_defaults_validate_resolve_and_build_a_model_on_either_device():
    """Whatever config.py's defaults are edited to: they pass validation, every auto resolves, and the model they
    describe builds and runs a forward pass (the values themselves are the docs' to justify, not this test's)."""
    from model import Transformer
    from config import AUTO_VALUES, MODEL_FIELDS
    Config().validate()
    for device in ("cpu", "cuda"):
        for n_train_pairs in (0, config.LARGE_DATA_PAIRS):  # the small and the large recipe
            cfg = resolve_autos(Config.from_args([]), torch.device(device), n_train_pairs)
            cfg.validate()
            assert all(getattr(cfg, name) != auto for name, auto in AUTO_VALUES.items()
                       if name not in ("epochs", "tie_embeddings"))  # epochs resolves in train.py
            model = Transformer(60, 60, 0, **{name: getattr(cfg, name) for name in MODEL_FIELDS})
            ids = torch.randint(4, 50, (2, 7))
            assert model(ids, ids).shape == (2, 7, 60)


def test_the_auto_tokenizer_goes_by_the_training_split_and_flags_win():
    small, large = (resolve_autos(Config(), torch.device("cpu"), n) for n in (config.LARGE_DATA_PAIRS - 1,
                                                                             config.LARGE_DATA_PAIRS))
    assert (small.tokenizer, small.tie_embeddings) == ("word", False)
    assert (large.tokenizer, large.tie_embeddings) == ("bpe", True)
    chosen = resolve_autos(Config(tokenizer="bpe", tie_embeddings=False), torch.device("cpu"))
    assert (chosen.tokenizer, chosen.tie_embeddings) == ("bpe", False)


def test_cuda_autos_are_a_token_budget_of_fixed_shape_with_a_raised_rate_and_dropout():
    import runtime
    cfg = resolve_autos(Config(max_tokens=-1, batch_shape="auto", lr=0, dropout=-1, batching="packed"),
                        torch.device("cuda"))
    assert (cfg.max_tokens, cfg.batch_shape, cfg.dropout) == (runtime.GPU_MAX_TOKENS, "fixed", runtime.GPU_DROPOUT)
    base_lr = runtime.BASE_LR
    assert cfg.lr == pytest.approx(base_lr * (runtime.GPU_MAX_TOKENS / runtime.BASE_LR_TOKENS) ** 0.5)
    assert resolve_autos(Config(max_tokens=1024, lr=0), torch.device("cuda")).lr == base_lr  # never below
    chosen = resolve_autos(Config(lr=1e-3, batch_shape="varied", max_tokens=4096, dropout=0), torch.device("cuda"))
    assert (chosen.lr, chosen.batch_shape, chosen.max_tokens, chosen.dropout) == (1e-3, "varied", 4096, 0)  # flags win
    assert resolve_autos(Config(batching="bucketed"), torch.device("cuda")).batch_shape == "varied"


def test_flags_are_derived_from_fields():
    cfg = Config.from_args(["--epochs", "3", "--d_model", "256", "--data_files", "a.jsonl", "b.tsv",
                            "--compile", "true", "--lr", "5e-4", "--share", "cycle"])
    assert cfg.epochs == 3 and cfg.d_model == 256 and cfg.data_files == ["a.jsonl", "b.tsv"]
    assert cfg.compile is True and cfg.lr == 5e-4 and cfg.share == "cycle"
    assert Config.from_args(["--compile", "false"]).compile is False


@pytest.mark.parametrize("argv, message", [
    (["--d_model", "512", "--n_heads", "7"], "--n_heads must divide --d_model (got 512 and 7)"),
    (["--d_model", "33", "--n_heads", "1"], "--d_model must be even"),
    (["--share", "ring"], "argument --share: invalid choice: 'ring' (choose from 'none', 'sequence'"),
    (["--n_layers", "6", "--n_unique_layers", "7"], "--n_unique_layers must not exceed --n_layers"),
    (["--tokenizer", "sentencepiece"], "argument --tokenizer: invalid choice: 'sentencepiece' (choose from 'auto'"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["--val_fraction", "1.5"], "--val_fraction must be from 0 to 1 (got 1.5)"),
    (["--val_fraction", "0"], "--val_fraction must be between 0 and 1 (got 0.0)"),
    (["--d_model", "big"], "argument --d_model: invalid int value"),
    (["--compile", "maybe"], "expected true or false"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--data_files", "pairs.csv"], "--data_files takes .jsonl, .json, .tsv, .parquet"),
    (["--batching", "sorted"], "argument --batching: invalid choice: 'sorted'"),
    (["--max_positions", "160", "--max_src_tokens", "150", "--max_len_diff", "10"],
     "--max_positions must exceed"),
    (["--length_penalty", "nan"], "--length_penalty must be a finite number"),
    (["--max_len_a", "inf"], "--max_len_a must be a finite number"),
    (["--max_len_a", "-1"], "--max_len_a must be from 0 to 65,536 (got -1.0)"),
    (["--max_tokens", "-2"], "--max_tokens must be from -1 to 16,777,216 (got -2)"),
    (["--max_tokens", "8"], "--max_tokens must be -1 (auto), 0 or at least 16"),
    (["--lr", "-0.001"], "--lr must be from 0 to 10 (got -0.001)"),
    (["--dropout", "-0.5"], "--dropout must be -1 (auto) or at least 0 and below 1"),
    (["--dropout", "1"], "(got 1.0)"),
    (["--attn_dropout", "1"], "--attn_dropout must be below 1 (got 1.0)"),
    (["--batch_shape", "square"], "argument --batch_shape: invalid choice: 'square'"),
    (["--batch_shape", "fixed", "--batching", "bucketed"], "--batch_shape fixed needs --batching packed"),
    (["--batch_shape", "fixed", "--batching", "packed", "--max_tokens", "0"],
     "--batch_shape fixed needs --batching packed and a token"),
])
def test_bad_flags_exit_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        Config.from_args(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_tying_is_accepted_with_bpe():
    assert Config.from_args(["--tokenizer", "bpe", "--tie_embeddings", "true"]).tie_embeddings


def test_a_config_built_in_code_is_checked_against_the_choices_as_flags_are():
    with pytest.raises(ValueError, match="--share must be one of none, sequence, cycle, cycle_rev"):
        Config(share="ring").validate()


def test_help_groups_every_flag_with_its_text_choices_and_default(capsys):
    with pytest.raises(SystemExit):
        Config.from_args(["--help"])
    out = capsys.readouterr().out
    sections = {}
    for block in out.split("\n\n"):
        title, _, rest = block.partition(":\n")
        sections[title.strip()] = " ".join(rest.split())
    assert {"data", "model", "optimisation", "system", "evaluation"} <= set(sections)
    for f in dataclasses.fields(Config):
        text = sections[f.metadata["group"]]
        assert f"--{f.name} " in text, f.name
        help_text = text.split(f"--{f.name} ", 1)[1].split("(default:", 1)[0]
        assert " ".join(f.metadata["help"].split()[:3]) in help_text, f.name
    assert "--share {none,sequence,cycle,cycle_rev}" in sections["model"]
    assert "--compile true|false" in sections["system"]


def test_every_auto_is_asked_for_by_the_word_auto_and_shown_so_in_help(capsys):
    from config import AUTO_MARKERS
    cfg = Config.from_args([arg for name in AUTO_MARKERS for arg in (f"--{name}", "auto")])
    assert all(getattr(cfg, name) == marker for name, marker in AUTO_MARKERS.items())
    assert cfg == Config()  # every auto field's default is its auto
    with pytest.raises(SystemExit):
        Config.from_args(["--lr", "fast"])
    assert "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        Config.from_args(["--help"])
    out = capsys.readouterr().out
    for name in AUTO_MARKERS:
        entry = " ".join(out.split(f"\n  --{name} ", 1)[1].split())
        assert entry.split("(default:", 1)[1].startswith(" auto)"), name
