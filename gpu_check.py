"""Prove the GPU path end to end, offline, in one device call of under 7 minutes, and write one JSON summary:

    python gpu_check.py [--data_files F ...] [--test_file F] [--seconds 5] [--quality_minutes 1] [--out gpu_check.json]

Sections, each with its own time limit, the JSON rewritten after every one (a call cut short still leaves what
it measured): tests/test_cuda.py (pytest's whole output when a test fails); bench.py's variants (the default's
CUDA graph against the same step launched eagerly, fp16 and compile among them, each with fraction_of_peak, its
`cuda_graph` status and the attention kernels; the input pipeline alone; a profile of the default step: wall ms,
GPU-kernel ms, kernels run and launches made per step); a time-to-quality run (`train.py --max_minutes Q`: steps,
validation loss and BLEU, evaluation and saving time, then BLEU of its last.pt on --test_file); a 2-process
torchrun run when two GPUs are visible. Data: --data_files, else the large set in ../shared/data where present,
else the test fixture. Exits non-zero when a section fails or the default step's CUDA graph was not captured.
Without a GPU it says so in one line (and in the JSON) and exits 1.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(ROOT, "..", "shared", "data")
LARGE_SET = ("europarl_en_fr.jsonl", "tatoeba_large_en_fr.jsonl", "news_en_fr.jsonl")
TIMEOUTS = {"tests": 100, "bench": 160, "quality": 120, "test_eval": 20, "torchrun": 60}  # seconds: 400 on one GPU


def run_section(summary, name, command, timeout, out):
    """Run one section's command, keep its JSON lines (bench.py prints one per variant as it finishes) and, when
    it fails, everything else it printed; write the whole summary to `out` at once."""
    started = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        stdout, stderr, returncode = result.stdout, result.stderr, result.returncode
    except subprocess.TimeoutExpired as expired:  # keep what it printed: where it hung is the clue
        stdout, stderr = (part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                          for part in (expired.stdout, expired.stderr))
        returncode = None
    section = {"returncode": returncode, "seconds": round(time.time() - started, 1), "records": []}
    stray = []
    for line in stdout.splitlines():
        try:
            section["records"].append(json.loads(line))
        except json.JSONDecodeError:
            stray.append(line)
    if returncode is None:
        section["error"] = f"timed out after {timeout} s"
    if stray:
        section["summary"] = stray[-1]  # pytest's closing line, or whatever else was printed last
    if returncode != 0:
        section["output"] = "\n".join(stray) + "\n" + stderr
    summary[name] = section
    write(summary, out)
    return section


def write(summary, out):
    with open(out + ".tmp", "w") as file:
        json.dump(summary, file, indent=2)
    os.replace(out + ".tmp", out)


def failures(summary):
    """The sections that failed, and the default variant's CUDA graph unless it was captured."""
    failed = [name for name, section in summary.items() if isinstance(section, dict) and "returncode" in section
              and section["returncode"] != 0]
    default = [record for record in summary.get("bench", {}).get("records", []) if record.get("variant") == "default"]
    if "bench" in summary and (not default or default[0].get("cuda_graph") != "captured"):
        failed.append(f"the default step's CUDA graph ({default[0]['cuda_graph'] if default else 'not measured'})")
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_files", nargs="*", help="training pairs (default: see above)")
    parser.add_argument("--test_file", help="pairs no run trained on, to score the quality run's last.pt "
                                            "(default: ../shared/data/newstest2013_en_fr.jsonl where present)")
    parser.add_argument("--seconds", type=float, default=5.0, help="bench.py training time per variant")
    parser.add_argument("--quality_minutes", type=float, default=1.0, help="--max_minutes of the time-to-quality run")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON summary goes")
    args = parser.parse_args()
    large = [os.path.join(SHARED, name) for name in LARGE_SET]
    data_files = (args.data_files or (large if all(map(os.path.isfile, large)) else None)
                  or [os.path.join(ROOT, "tests", "fixtures", "pairs.jsonl")])
    newstest = os.path.join(SHARED, "newstest2013_en_fr.jsonl")
    test_file = args.test_file or (newstest if os.path.isfile(newstest) else None)
    summary = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "cuda_version": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "data_files": data_files, "test_file": test_file}
    write(summary, args.out)
    if not summary["cuda"]:
        raise SystemExit(f"error: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); run this on a GPU machine. Wrote {args.out}")
    started = time.time()
    run_section(summary, "tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   "tests/test_cuda.py"], TIMEOUTS["tests"], args.out)
    run_section(summary, "bench", [sys.executable, "bench.py", "--data_files", *data_files, "--seconds",
                                   str(args.seconds), "--decode_sentences", "300", "--profile_steps", "20"],
                TIMEOUTS["bench"], args.out)
    with tempfile.TemporaryDirectory() as run_dir:
        quality = run_section(summary, "quality", [sys.executable, "train.py", "--data_files", *data_files,
                                                   "--max_minutes", str(args.quality_minutes), "--run_dir", run_dir],
                              TIMEOUTS["quality"], args.out)
        if quality["returncode"] == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as file:
                lines = [json.loads(line) for line in file]
            quality.update({key: lines[-1].get(key) for key in (
                "step", "val_loss", "bleu", "chrf", "tokens_per_sec", "fraction_of_peak", "elapsed_seconds")},
                evaluations=len(lines), train_seconds=sum(line["epoch_seconds"] for line in lines),
                eval_seconds=sum(line["eval_seconds"] for line in lines))
            if test_file:
                result = subprocess.run([sys.executable, "translate.py", "--checkpoint",
                                         os.path.join(run_dir, "last.pt"), "--eval", test_file],
                                        capture_output=True, text=True, timeout=TIMEOUTS["test_eval"], cwd=ROOT)
                quality["test"] = json.loads(result.stdout) if result.returncode == 0 else result.stderr[-2000:]
            write(summary, args.out)
    if torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as run_dir:
            run_section(summary, "torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                              "train.py", "--data_files", *data_files, "--epochs", "1", "--max_steps",
                                              "100", "--n_eval_sentences", "100", "--run_dir", run_dir],
                        TIMEOUTS["torchrun"], args.out)
    summary["seconds"] = round(time.time() - started, 1)
    write(summary, args.out)
    print(json.dumps(summary, indent=2))
    failed = failures(summary)
    if failed:
        raise SystemExit(f"error: {'; '.join(failed)} failed; see {args.out}")


if __name__ == "__main__":
    main()
