import json

import pytest
import torch

from conftest import TINY, FIXTURE, cpu_config, run_script


def test_bench_prints_one_json_object_with_every_variant():
    result = run_script("bench.py", "--data_files", FIXTURE, "--seconds", "0.3", "--decode_sentences", "8",
                        "--profile_steps", "2", *TINY)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["variants"]) == {"fixed", "dynamic", "bucketed", "bucketed_amp", "packed", "packed_amp",
                                       "default"}
    for variant in report["variants"].values():
        assert variant["real_tokens_per_sec"] > 0 and 0 <= variant["pad_fraction"] < 1
        assert 0 <= variant["epoch_pad_fraction"] < 1 and 0 < variant["fraction_of_peak"] < 1
        assert variant["attention_kernels"]  # which SDPA kernel ran is visible
    assert report["amp_auto"] in ("fp32", "bf16")  # measured by bench.py itself: the faster one on this CPU
    assert (report["variants"]["default"]["batching"], report["variants"]["default"]["precision"]) == \
        ("packed", report["amp_auto"])
    assert report["ratios_vs_dynamic"]["dynamic"] == 1.0
    # the baseline is the reference's technique whatever the defaults are: fp32, dropout 0.1 everywhere
    dynamic = report["variants"]["dynamic"]
    assert (dynamic["batching"], dynamic["precision"], dynamic["dropout"], dynamic["attn_dropout"]) == \
        ("random", "fp32", 0.1, 0.1)
    assert report["variants"]["default"]["dropout"] == cpu_config().dropout == 0.0  # auto on a CPU
    pads = {name: v["pad_fraction"] for name, v in report["variants"].items()}
    assert pads["fixed"] > pads["dynamic"] > max(pads["bucketed"], pads["packed"])
    assert report["profile"]["steps"] == 2 and report["profile"]["wall_ms_per_step"] > 0
    assert set(report["decoding_by_precision"]) == {"fp32", "bf16", "int8"}
    assert {"greedy_no_cache_sentences_per_sec", "greedy_cache_sentences_per_sec", "beam4_sentences_per_sec"} <= \
        set(report["decoding"])


def test_bench_refuses_to_download():
    result = run_script("bench.py", "--seconds", "1")
    assert result.returncode != 0 and "needs --data_files" in result.stderr


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_in_its_json(tmp_path):
    if torch.cuda.is_available():
        return  # on a GPU machine this command is the GPU check itself, minutes long
    out = tmp_path / "summary.json"
    result = run_script("gpu_check.py", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA GPU is visible" in result.stderr
    assert json.loads(out.read_text())["cuda"] is False


@pytest.mark.parametrize("flags, message", [
    (["--decode_sentences", "0"], "--decode_sentences and --decode_beam at least 1"),
    (["--decode_beam", "0"], "--decode_sentences and --decode_beam at least 1"),
    (["--seconds", "-5"], "--seconds must be positive and finite"),
    (["--decode_checkpoint", "missing.pt"], "--decode_checkpoint missing.pt: no such file"),
])
def test_bench_checks_its_flags_before_it_trains(flags, message):
    result = run_script("bench.py", "--data_files", FIXTURE, *TINY, *flags)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]  # one line, and nothing was loaded or trained first
