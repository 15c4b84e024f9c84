import pytest
import torch

from config import Config
from runtime import resolve_autos


def test_defaults_keep_the_reference_architecture_with_the_measured_recipe():
    """The reference recipe itself is one README command (test_train checks it); the defaults are the README's
    time-to-quality choice: two-phase cosine OneCycle at the reference's peak, no dropout, packed batches (on a
    CPU; CUDA's autos are tested below)."""
    cfg = resolve_autos(Config.from_args([]), torch.device("cpu"))
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.n_unique_layers, cfg.share) == (512, 8, 128, 6, 3, "cycle_rev")
    assert (cfg.dataset, cfg.lang_src, cfg.lang_tgt, cfg.tokenizer, cfg.amp) == ("opus_books", "en", "fr", "word", "auto")
    assert (cfg.lr, cfg.pct_start, cfg.three_phase, cfg.anneal_strategy) == (5e-4, 0.1, False, "cos")
    assert (cfg.label_smoothing, cfg.dropout, cfg.attn_dropout, cfg.batch_size) == (0.1, 0.0, 0.0, 32)
    assert (cfg.batching, cfg.max_tokens, cfg.accum_steps) == ("packed", 0, 1)  # random batches of 32, packed
    assert (cfg.batch_shape, cfg.epochs) == ("varied", 0)  # epochs 0: 10, or as many as --max_minutes allows


def test_cuda_autos_are_a_token_budget_of_fixed_shape_with_a_raised_rate_and_dropout():
    cfg = resolve_autos(Config(), torch.device("cuda"))
    assert (cfg.max_tokens, cfg.batch_shape, cfg.dropout) == (16384, "fixed", 0.1)
    assert cfg.lr == pytest.approx(5e-4 * (16384 / 2048) ** 0.5)
    assert resolve_autos(Config(max_tokens=1024), torch.device("cuda")).lr == 5e-4  # never below the base rate
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
    (["--n_heads", "7"], "n_heads must divide d_model (got 512 and 7)"),
    (["--share", "ring"], "--share must be one of none, sequence, cycle, cycle_rev"),
    (["--n_unique_layers", "7"], "--n_unique_layers must not exceed --n_layers"),
    (["--tie_embeddings", "true"], "--tie_embeddings true needs --tokenizer bpe"),
    (["--amp", "fp8"], "--amp must be one of"),
    (["--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
    (["--d_model", "big"], "argument --d_model: invalid int value"),
    (["--compile", "maybe"], "expected true or false"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    (["--data_files", "pairs.csv"], "--data_files takes .jsonl, .tsv or .parquet"),
    (["--batching", "sorted"], "--batching must be one of packed, bucketed, random"),
    (["--max_positions", "160"], "--max_positions must exceed --max_src_tokens + --max_len_diff"),
    (["--length_penalty", "nan"], "--length_penalty must be a finite number (got nan)"),
    (["--max_len_a", "inf"], "--max_len_a must be a finite number (got inf)"),
    (["--max_len_a", "-1"], "--max_len_a must not be negative (got -1.0)"),
    (["--max_tokens", "-2"], "--max_tokens must be -1 (auto), 0 or at least 16"),
    (["--lr", "-0.001"], "--lr must not be negative"),
    (["--dropout", "-0.5"], "--dropout must be -1 (auto) or at least 0 and below 1 (got -0.5)"),
    (["--dropout", "1"], "--dropout must be -1 (auto) or at least 0 and below 1 (got 1.0)"),
    (["--attn_dropout", "1"], "--attn_dropout must be below 1 (got 1.0)"),
    (["--batch_shape", "square"], "--batch_shape must be one of auto, fixed, varied"),
    (["--batch_shape", "fixed", "--batching", "bucketed"], "--batch_shape fixed needs --batching packed"),
    (["--batch_shape", "fixed", "--max_tokens", "0"], "--batch_shape fixed needs --batching packed and a token"),
])
def test_bad_flags_exit_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        Config.from_args(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_tying_is_accepted_with_bpe():
    assert Config.from_args(["--tokenizer", "bpe", "--tie_embeddings", "true"]).tie_embeddings


def test_every_field_has_a_comment_shown_by_help(capsys):
    with pytest.raises(SystemExit):
        Config.from_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--pack_length PACK_LENGTH packed: tokens a side per row" in out
    options = out.split("options:")[1]
    for name in Config.__dataclass_fields__:
        help_text = options.split(f"--{name} ", 1)[1].split("(default:", 1)[0]
        assert len(help_text.split()) >= 3, name  # metavar plus a comment of at least two words
