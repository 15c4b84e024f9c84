import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pairs.jsonl")
LEGACY_CHECKPOINT = os.path.join(ROOT, "tests", "fixtures", "legacy", "interrupted.pt")  # test_legacy_checkpoint
sys.path.insert(0, ROOT)

import step  # noqa: E402
from config import Config  # noqa: E402
from model import Transformer  # noqa: E402
from runtime import resolve_autos  # noqa: E402

PAD, SOS, EOS = 0, 2, 3
TINY = ["--d_model", "32", "--n_heads", "2", "--d_ff", "64", "--n_layers", "2", "--n_unique_layers", "1",
        "--device", "cpu", "--max_tokens", "600", "--n_eval_sentences", "8", "--log_every", "5"]


def cpu_config(**fields):
    """A Config with its auto fields resolved as a run on a CPU resolves them (the peak lr, for one)."""
    return resolve_autos(Config(**fields), torch.device("cpu"))


def tiny_args(run_dir, *extra):
    return ["--data_files", FIXTURE, "--run_dir", str(run_dir), *TINY, *extra]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(script, *args, stdin=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def make_model(vocab=40, share="none", n_layers=2, n_unique=2, tie=False, dropout=0.0, seed=0, d_model=32):
    torch.manual_seed(seed)
    return Transformer(vocab, vocab, PAD, d_model=d_model, n_heads=4, d_ff=64, n_layers=n_layers,
                       n_unique_layers=n_unique, share=share, tie_embeddings=tie, dropout=dropout).eval()


def random_batch(lengths, vocab=40, seed=0):
    """Right-padded (B, max) tensor of random ids in [4, vocab) with the given lengths (EOS last)."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.full((len(lengths), max(lengths)), PAD)
    for row, length in enumerate(lengths):
        batch[row, :length - 1] = torch.randint(4, vocab, (length - 1,), generator=generator)
        batch[row, length - 1] = EOS
    return batch


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def assert_same_training(straight_dir, resumed_dir, names=("train_loss", "val_loss"), **tolerance):
    """The runs in the two directories logged the same evaluations: the same steps, and the same losses within
    `tolerance` (pytest.approx's; default abs=1e-6), as a resumed run must against an uninterrupted one."""
    straight, resumed = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [line["step"] for line in resumed] == [line["step"] for line in straight]
    for a, b in zip(straight, resumed):
        for name in names:
            assert a[name] == pytest.approx(b[name], **(tolerance or {"abs": 1e-6})), (a["step"], name)


def one_batch(vocab=40):
    tgt = random_batch([4, 6, 3], vocab=vocab, seed=1)
    tgt_in = torch.cat([torch.full((3, 1), SOS), tgt[:, :-1]], 1).masked_fill(tgt == PAD, PAD)
    return {"src": random_batch([5, 3, 7], vocab=vocab), "tgt_in": tgt_in, "labels": tgt}


class Crash(Exception):
    pass


def patch_nth_call(monkeypatch, owner, name, n, before=None, after=None):
    """owner.name patched so that its nth call runs before() first (which may raise: the call then fails) and
    after() once the call has returned."""
    real, calls = getattr(owner, name), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and before:
            before()
        result = real(*args, **kwargs)
        if len(calls) == n and after:
            after()
        return result

    monkeypatch.setattr(owner, name, patched)


@pytest.fixture
def nth_call(monkeypatch):
    """nth_call(owner, name, n, before=None, after=None): patch_nth_call, undone after the test."""
    return lambda *args, **kwargs: patch_nth_call(monkeypatch, *args, **kwargs)


def crash(error=None):
    """Raise `error`, or Crash (a process killed as by kill -9)."""
    raise error or Crash


def crash_at(monkeypatch, at_step, how):
    """Make train_step crash (like kill -9) or send SIGTERM to this process at a given step."""
    if how == "kill":
        patch_nth_call(monkeypatch, step, "train_step", at_step, before=crash)
    else:
        patch_nth_call(monkeypatch, step, "train_step", at_step, after=lambda: os.kill(os.getpid(), signal.SIGTERM))


def tree(root):
    """Every path under root, each with its content (None for a directory)."""
    return {os.path.relpath(os.path.join(top, name), root): None if name in dirs else open(os.path.join(top, name),
                                                                                           "rb").read()
            for top, dirs, files in os.walk(root) for name in dirs + files}


def kept(before, root):
    """Whether everything of `before` (a tree) is still under root, unchanged; new files (a run's .lock) may be."""
    after = tree(root)
    return {path: after.get(path, "deleted") for path in before} == before


def one_line_failure(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err + (str(stop.value.code) if isinstance(stop.value.code, str) else "")
    assert stop.value.code not in (0, None) and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True, scope="session")
def data_cache_in_a_temporary_directory(tmp_path_factory):
    """--data_cache auto keeps prepared data in $XDG_CACHE_HOME: for the tests (and the scripts they start), a
    directory of their own, never the machine's cache."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if saved is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(autouse=True)
def data_cache_of_its_own(tmp_path_factory, monkeypatch):
    """Each test prepares its data afresh, as it did before the cache: a test that changes how data is prepared
    never maps another test's entry."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """train.main installs SIGINT/SIGTERM handlers; tests that call it in-process must not leak them."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """best.pt of a tiny model trained for one epoch on the fixture, shared by the tests that translate."""
    import train
    run_dir = tmp_path_factory.mktemp("run")
    train.main(tiny_args(run_dir, "--epochs", "1"))
    return str(run_dir / "best.pt")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A directory on a tmpfs of a given size (root only: elsewhere the test skips), unmounted afterwards."""
    mounted = []

    def mount(size):
        path = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        path.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])
