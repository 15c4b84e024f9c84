import json

import pytest
import torch

from conftest import TINY, FIXTURE, cpu_config, run_script


def read_records(stdout):
    """bench.py's stdout: one JSON object a line, nothing else."""
    return [json.loads(line) for line in stdout.splitlines()]


def test_bench_prints_a_json_line_per_variant_and_nothing_else_on_stdout():
    result = run_script("bench.py", "--data_files", FIXTURE, "--seconds", "0.3", "--decode_sentences", "8",
                        "--profile_steps", "2", *TINY)
    assert result.returncode == 0, result.stderr
    records = read_records(result.stdout)
    header, variants = records[0], {r["variant"]: r for r in records if "variant" in r}
    report = {key: value for record in records[1:] if "variant" not in record for key, value in record.items()}
    assert [r["variant"] for r in records if "variant" in r][0] == "default"  # measured first
    assert set(variants) == {"fixed", "dynamic", "bucketed", "bucketed_amp", "packed", "packed_amp", "default",
                             "loader", "loader_64k"}
    trained = {name: v for name, v in variants.items() if not name.startswith("loader")}
    for variant in trained.values():
        assert variant["real_tokens_per_sec"] > 0 and 0 <= variant["pad_fraction"] < 1
        assert 0 <= variant["epoch_pad_fraction"] < 1 and 0 < variant["fraction_of_peak"] < 1
        assert variant["attention_kernels"]  # which SDPA kernel ran is visible
        assert variant["cuda_graph"] == "off: not on CUDA"
    for name, tokens in (("loader", 16384), ("loader_64k", 65536)):  # the CUDA default's input pipeline alone
        assert variants[name]["real_tokens_per_sec"] > 0 and variants[name]["max_tokens"] == tokens
        assert variants[name]["num_workers"] == 2
    assert header["amp_auto"] in ("fp32", "bf16")  # measured by bench.py itself: the faster one on this CPU
    assert (variants["default"]["batching"], variants["default"]["precision"]) == ("packed", header["amp_auto"])
    assert report["ratios_vs_dynamic"]["dynamic"] == 1.0
    # the baseline is the reference's technique whatever the defaults are: fp32, dropout 0.1 everywhere
    dynamic = variants["dynamic"]
    assert (dynamic["batching"], dynamic["precision"], dynamic["dropout"], dynamic["attn_dropout"]) == \
        ("random", "fp32", 0.1, 0.1)
    assert variants["default"]["dropout"] == cpu_config().dropout  # auto, as a run on this CPU resolves it
    pads = {name: v["pad_fraction"] for name, v in trained.items()}
    assert pads["fixed"] > pads["dynamic"] > max(pads["bucketed"], pads["packed"])
    assert report["profile"]["steps"] == 2 and report["profile"]["wall_ms_per_step"] > 0
    assert set(report["decoding_by_precision"]) == {"fp32", "bf16", "int8"}
    assert {"greedy_no_cache_sentences_per_sec", "greedy_cache_sentences_per_sec", "beam4_sentences_per_sec"} <= \
        set(report["decoding"])


def test_bench_runs_the_variants_asked_for():
    result = run_script("bench.py", "--data_files", FIXTURE, "--seconds", "0.2", "--variants", "loader", *TINY)
    assert result.returncode == 0, result.stderr
    assert [r.get("variant") for r in read_records(result.stdout)] == [None, "loader"]
    result = run_script("bench.py", "--data_files", FIXTURE, "--variants", "quick", *TINY)
    assert result.returncode != 0 and "--variants: no variant quick; choose from default" in result.stderr


# a bench that measures one variant, prints a stray warning on stdout, then dies halfway
FAILING_BENCH = """
import json, sys
print(json.dumps({"variant": "default", "real_tokens_per_sec": 123.0, "cuda_graph": "failed: no capture"}))
print("warning: something printed to stdout")
sys.stdout.flush()
raise SystemExit("error: died halfway")
"""


def test_gpu_check_keeps_what_a_failing_section_measured_and_says_why(tmp_path):
    import sys
    import gpu_check
    out = str(tmp_path / "summary.json")
    summary = {"cuda": True}
    section = gpu_check.run_section(summary, "bench", [sys.executable, "-c", FAILING_BENCH], 60, out)
    written = json.loads(open(out).read())
    assert written["bench"] == section and section["returncode"] == 1
    assert section["records"] == [{"variant": "default", "real_tokens_per_sec": 123.0,
                                   "cuda_graph": "failed: no capture"}]
    assert "warning: something printed to stdout" in section["output"] and "died halfway" in section["output"]
    assert gpu_check.failures(written) == ["bench", "the default step's CUDA graph (failed: no capture)"]
    section = gpu_check.run_section(summary, "slow", [sys.executable, "-c", "import time; print('{}'); "
                                                      "import sys; sys.stdout.flush(); time.sleep(30)"], 1, out)
    assert section["returncode"] is None and section["error"] == "timed out after 1 s" and section["records"] == [{}]
    assert "slow" in gpu_check.failures(json.loads(open(out).read()))


def test_bench_refuses_to_download():
    result = run_script("bench.py", "--seconds", "1")
    assert result.returncode != 0 and "needs --data_files" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this command is the GPU check itself")
def test_gpu_check_without_a_gpu_says_so_in_one_line_and_in_its_json(tmp_path):
    out = tmp_path / "summary.json"
    result = run_script("gpu_check.py", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA GPU is visible" in result.stderr
    assert json.loads(out.read_text())["cuda"] is False


@pytest.mark.parametrize("flags, message", [
    (["--decode_sentences", "0"], "--decode_sentences must be from 1 to 10,000,000 (got 0)"),
    (["--decode_beam", "0"], "--decode_beam must be from 1 to 128 (got 0)"),
    (["--seconds=-5"], "--seconds must be from 0.001 to 1,000,000 (got -5.0)"),
    (["--decode_checkpoint", "missing.pt"], "--decode_checkpoint missing.pt: no such file"),
    (["--decode_file", FIXTURE], "--decode_file needs --decode_checkpoint"),
])
def test_bench_checks_its_flags_before_it_trains(flags, message):
    result = run_script("bench.py", "--data_files", FIXTURE, *TINY, *flags)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]  # one line, and nothing was loaded or trained first


def test_bench_decodes_a_checkpoint_in_every_engine_and_precision_with_its_bleu(checkpoint):
    pytest.importorskip("ctranslate2", reason="CTranslate2 is not installed (pip install ctranslate2)")
    result = run_script("bench.py", "--data_files", FIXTURE, *TINY, "--variants", "none", "--decode_checkpoint",
                        checkpoint, "--decode_file", FIXTURE, "--decode_sentences", "40")
    assert result.returncode == 0, result.stderr
    rows = [record for record in read_records(result.stdout) if "engine" in record]
    assert {(row["engine"], row["beam"]) for row in rows} == {
        (engine, beam) for engine in ("torch_fp32", "torch_bf16", "torch_int8", "ctranslate2_float32",
                                      "ctranslate2_int8") for beam in (1, 4)}
    assert all(row["sentences"] == 40 and row["sentences_per_sec"] > 0 and row["bleu"] >= 0 for row in rows)
    by_engine = {(row["engine"], row["beam"]): row["bleu"] for row in rows}
    assert by_engine[("torch_fp32", 1)] == by_engine[("ctranslate2_float32", 1)]  # the same tokens
