"""export.py and translate.py --engine ctranslate2: the exported model decodes token for token as the PyTorch
path does (greedy in float32; beam search ranks finished hypotheses by another length penalty, so it agrees on
most sentences, not all), for each kind of model the project trains; a failed export leaves nothing behind."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import dataset
import export
import train
import translate
from conftest import FIXTURE, LEGACY_CHECKPOINT, run_script, tiny_args
from errors import RunError

ctranslate2 = pytest.importorskip("ctranslate2", reason="CTranslate2 is not installed (pip install ctranslate2)")

SENTENCES = [source for source, _ in dataset.read_pairs([FIXTURE], "en", "fr")[0][:120]]
SHAPES = {  # a model of each kind: joint BPE tied to the output with shared layers, and a deeper decoder
    "bpe_tied_shared": ["--tokenizer", "bpe", "--vocab_size", "400", "--tie_embeddings", "true", "--share",
                        "cycle_rev", "--n_layers", "3", "--n_unique_layers", "2", "--n_decoder_layers", "2"],
    "word_untied": ["--tokenizer", "word", "--share", "none", "--n_decoder_layers", "0"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(kind): (checkpoint, its exported directory) of a model of that kind trained for two epochs, or of
    the legacy checkpoint; made once per module."""
    made = {}

    def make(kind):
        if kind not in made:
            path = LEGACY_CHECKPOINT
            if kind != "legacy":
                run_dir = tmp_path_factory.mktemp(kind)
                train.main(tiny_args(run_dir, "--epochs", "2", "--amp", "off", *SHAPES[kind]))
                path = str(run_dir / "last.pt")
            made[kind] = path, export.export(path, str(tmp_path_factory.mktemp("export") / "model"))
        return made[kind]
    return make


@pytest.fixture(params=list(SHAPES) + ["legacy"])
def trained(request, exported):
    return exported(request.param)


def both_engines(path, directory, beam):
    """Token ids of the fixture sentences from the PyTorch path (fp32) and CTranslate2 (float32)."""
    model, src_tokenizer, tgt_tokenizer, cfg = checkpoint.load_translator(path, torch.device("cpu"))
    engine = export.Engine(directory, torch.device("cpu"))
    sources = dataset.encode(src_tokenizer, SENTENCES)
    ids = dataset.special_ids(tgt_tokenizer)
    options = dict(beam=beam, alpha=0.6, max_len_a=cfg["max_len_a"], max_len_b=cfg["max_len_b"])
    return translate.translate(model, sources, ids["sos"], ids["eos"], **options), engine.translate(sources, **options)


def test_greedy_decoding_is_token_identical(trained):
    ours, engines = both_engines(*trained, beam=1)
    assert ours == engines
    assert any(len(ids) > 3 for ids in ours)  # not a model that stops at once: the outputs say something


def test_beam_search_agrees_on_at_least_95_percent(trained):
    ours, engines = both_engines(*trained, beam=4)
    agree = sum(a == b for a, b in zip(ours, engines))
    assert agree >= 0.95 * len(ours), f"{agree} of {len(ours)}"


def test_an_engine_leaves_pytorch_with_its_threads(exported):
    """The engine sets the OpenMP thread count of the thread that builds it to its per-worker count (1), and
    PyTorch reads the same count: a PyTorch model decoding after it (bench.py) would run on one core."""
    _, directory = exported("word_untied")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = export.Engine(directory, torch.device("cpu"), threads=2)
        assert torch.get_num_threads() == 2
        assert engine.translate([[5, 6, 7]])[0]  # and its two workers translate
    finally:
        torch.set_num_threads(threads)


def test_the_snippet_in_the_exported_readme_runs_and_translates(exported):
    _, directory = exported("bpe_tied_shared")
    readme = open(os.path.join(directory, "README.md")).read()
    snippet = readme.split("```python\n")[1].split("```")[0]
    result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip()  # one translation, not an empty one


def test_shared_blocks_are_unrolled_and_tied_embeddings_shared(exported, tmp_path):
    path, _ = exported("bpe_tied_shared")
    model, src_tokenizer, tgt_tokenizer, _ = checkpoint.load_translator(path, torch.device("cpu"))
    vocabularies = export.vocabulary(src_tokenizer), export.vocabulary(tgt_tokenizer)
    spec = export.model_spec(model, vocabularies, dataset.special_ids(tgt_tokenizer))
    assert len(spec.encoder.layer) == 3 and len(spec.decoder.layer) == 2  # every position, from 2 blocks
    assert model.layout == [0, 1, 1]  # cycle_rev over 2 blocks: positions 1 and 2 share block 1
    first, second, third = (layer.self_attention.linear[0].weight for layer in spec.encoder.layer)
    assert (second == third).all() and not (first == second).all()
    assert (spec.encoder.embeddings[0].weight == spec.decoder.projection.weight).all()
    export.export(path, str(tmp_path / "int8"), "int8")
    export.export(path, str(tmp_path / "fp32"))
    assert os.path.getsize(tmp_path / "int8" / "model.bin") < 0.7 * os.path.getsize(tmp_path / "fp32" / "model.bin")


def test_translate_with_the_engine_keeps_the_command_line_conventions(exported):
    path, directory = exported("bpe_tied_shared")
    lines = "I am tired.\n\nWhere is the station?\n"
    for engine_args in (["--model", directory], ["--checkpoint", path]):
        result = run_script("translate.py", "--engine", "ctranslate2", *engine_args, "--beam", "4", stdin=lines)
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.split("\n")) == 4 and result.stdout.split("\n")[1] == "", result.stdout
    scored = run_script("translate.py", "--engine", "ctranslate2", "--model", directory, "--eval", FIXTURE, "--int8")
    assert json.loads(scored.stdout)["engine"] == "ctranslate2" and json.loads(scored.stdout)["n"] == 300


def test_export_over_an_existing_path_is_refused_and_changes_nothing(exported, tmp_path, capsys):
    path, _ = exported("word_untied")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code = run_main(["--checkpoint", path, "--out", str(taken)], capsys)
    assert code[0] and "exists" in code[1]
    code = run_main(["--checkpoint", path, "--out", str(taken), "--force", "true"], capsys)
    assert code[0] and "holds what export.py does not write (keep.txt)" in code[1]
    assert os.listdir(taken) == ["keep.txt"]


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(small_tmpfs, capsys):
    disk = small_tmpfs("16k")
    code, err = run_main(["--checkpoint", LEGACY_CHECKPOINT, "--out", str(disk / "model")], capsys)
    assert code and len(err.strip().splitlines()) == 1 and "nothing of it was left behind" in err, err
    assert os.listdir(disk) == []


def test_what_is_not_a_checkpoint_or_not_an_export_is_one_line(tmp_path, capsys):
    not_ours = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, not_ours)
    code, err = run_main(["--checkpoint", str(not_ours), "--out", str(tmp_path / "out")], capsys)
    assert code and "not a checkpoint written by train.py" in err and not (tmp_path / "out").exists()
    with pytest.raises(RunError, match="not a model directory export.py wrote"):
        export.Engine(str(tmp_path), torch.device("cpu"))


def test_without_ctranslate2_installed_the_export_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # an import of it then fails, as when not installed
    with pytest.raises(RunError, match="pip install ctranslate2"):
        export.export(LEGACY_CHECKPOINT, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def run_main(argv, capsys):
    """(exit code, stderr) of export.main(argv), its one-line error included."""
    with pytest.raises(SystemExit) as exit_info:
        export.main(argv)
    code = exit_info.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    return code, err
