"""Prove the GPU path end to end, offline, in one device call of under 8 minutes, and write one JSON summary:

    python gpu_check.py [--data_files F ...] [--seconds 10] [--quality_minutes 1] [--out gpu_check.json]

Runs tests/test_cuda.py (keeping pytest's whole output when a test fails), bench.py's variants (the default's
CUDA graph against the same step launched eagerly, fp16, compile among them; fraction_of_peak and the attention
kernels for each) at the reference architecture with a profile of the default step (wall ms, GPU-kernel ms,
kernels run and launches made per step), a time-to-quality run
(`train.py --max_minutes Q`: steps, val_loss and BLEU on the validation split), a 2-process torchrun run when
two GPUs are visible, and records the torch, CUDA and cuDNN versions. Data: --data_files, else
../shared/data/*.jsonl where present, else the test fixture. Without a GPU it says so in one line (and in the
JSON) and exits 1.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(command, timeout):
    started = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as expired:  # keep what it printed: where it hung is the clue
        printed = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                          for part in (expired.stdout, expired.stderr))
        return {"returncode": None, "seconds": timeout, "error": f"timed out after {timeout} s",
                "output": printed}, ""
    report = {"returncode": result.returncode, "seconds": round(time.time() - started, 1)}
    if result.returncode:
        report["output"] = result.stdout + result.stderr
    return report, result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_files", nargs="*", help="pairs for bench.py and torchrun (default: see above)")
    parser.add_argument("--seconds", type=float, default=10.0, help="bench.py training time per variant")
    parser.add_argument("--quality_minutes", type=float, default=1.0, help="--max_minutes of the time-to-quality run")
    parser.add_argument("--out", default="gpu_check.json", help="where the JSON summary goes")
    args = parser.parse_args()
    data_files = (args.data_files or sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "*.jsonl")))
                  or [os.path.join(ROOT, "tests", "fixtures", "pairs.jsonl")])
    summary = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "cuda_version": torch.version.cuda,
               "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "data_files": data_files}
    if not summary["cuda"]:
        with open(args.out, "w") as file:
            json.dump(summary, file, indent=2)
        raise SystemExit(f"error: no CUDA GPU is visible (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); run this on a GPU machine. Wrote {args.out}")
    started = time.time()
    summary["tests"], output = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    "tests/test_cuda.py"], timeout=180)
    summary["tests"]["summary"] = output.strip().splitlines()[-1] if output.strip() else ""
    summary["bench"], output = run([sys.executable, "bench.py", "--data_files", *data_files, "--seconds",
                                    str(args.seconds), "--decode_sentences", "300", "--profile_steps", "20"],
                                   timeout=240)
    if summary["bench"]["returncode"] == 0:
        summary["bench"].update(json.loads(output))
    with tempfile.TemporaryDirectory() as run_dir:
        summary["quality"], _ = run([sys.executable, "train.py", "--data_files", *data_files, "--max_minutes",
                                     str(args.quality_minutes), "--run_dir", run_dir], timeout=300)
        if summary["quality"]["returncode"] == 0:
            with open(os.path.join(run_dir, "metrics.jsonl")) as file:
                lines = [json.loads(line) for line in file]
            summary["quality"].update({key: lines[-1].get(key) for key in (
                "step", "val_loss", "bleu", "chrf", "tokens_per_sec", "fraction_of_peak", "elapsed_seconds")},
                evaluations=len(lines))
    if torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as run_dir:
            summary["torchrun"], _ = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                          "train.py", "--data_files", *data_files, "--epochs", "1", "--max_steps",
                                          "100", "--n_eval_sentences", "100", "--run_dir", run_dir], timeout=300)
    summary["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as file:
        json.dump(summary, file, indent=2)
    print(json.dumps(summary, indent=2))
    failed = [name for name in ("tests", "bench", "quality", "torchrun") if name in summary and
              summary[name]["returncode"]]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see {args.out}")


if __name__ == "__main__":
    main()
