"""Everything a run keeps on disk: the run-directory lock, atomic writes, loading checkpoints (weights only, every
field checked by schema.py), the model a checkpoint translates with, resumability checks, restoring training state,
and the RNG states of every rank.

Knows nothing about the training loop: it saves and restores what it is handed.
"""
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import pickle
import random
import shutil

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

import dataset
import schema
from config import MODEL_FIELDS, Config
from errors import RunError
from model import Transformer
from step import parameter_groups

# Flags that may differ between a checkpoint and the run resuming it; any other difference is refused.
RESUME_MAY_CHANGE = {"resume", "run_dir", "device", "amp", "num_workers", "compile", "cuda_graph", "log_every",
                     "pad_multiple", "n_eval_sentences", "beam", "length_penalty", "max_len_a", "max_len_b",
                     "eval_every_minutes", "overwrite", "data_cache",
                     "tokenizer_sample_pairs"}  # the tokenizers are the checkpoint's; the data's ids the same
# A checkpoint whose config predates these fields was trained as these values train (its config lacks them).
PREDATED_FIELDS = {"n_decoder_layers": 0, "ema_decay": 0.0, "batch_shape": "varied", "lowercase_source": False,
                   "cycle_momentum": True, "max_val_pairs": 0, "max_len_ratio": 1.0, "eval_files": [],
                   "sampling_temperature": 1.0, "data_cache": "off", "tokenizer_sample_pairs": 0,
                   "decay_norms_and_biases": True}
CHECKPOINT_KEYS = ("model", "config", "tokenizers")  # what translate.py needs; resuming needs RESUME_KEYS too
RESUME_HINT = ", or resume a --run_dir's own with --resume auto"  # what a --resume naming a directory is told
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "ranks")  # and every field of Progress


@dataclasses.dataclass
class Progress:
    """Where the run stands: saved in every checkpoint, restored on resume."""
    total_steps: int
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    history: list = dataclasses.field(default_factory=list)  # one metrics line per evaluation
    elapsed_seconds: float = 0.0  # training and evaluation, all sessions
    train_seconds: float = 0.0  # training steps only, all sessions: what --max_minutes budgets
    calibrated: bool = False  # --max_minutes has sized the schedule


PROGRESS_KEYS = tuple(field.name for field in dataclasses.fields(Progress))


@dataclasses.dataclass
class Sums:
    """What a rank's training since the last evaluation adds up (the next metrics line reports it): saved in every
    checkpoint, each rank its own, so that a resumed run reports what an uninterrupted one does."""
    loss: float = 0.0  # summed over the target tokens
    tokens: int = 0  # target tokens the loss is summed over
    real_tokens: int = 0  # source and target tokens that are not padding
    seconds: float = 0.0
    skipped: int = 0  # updates skipped for non-finite gradients
    lr: float = 0.0  # the rate of the last step

    @classmethod
    def stored(cls, values):
        """Sums from a checkpoint's dict (schema.py checked its numbers; older ones may lack lr)."""
        return cls(**{name: values[name] for name in values if name in cls.__dataclass_fields__})


@contextlib.contextmanager
def locked_run_dir(run_dir, is_main):
    """Create run_dir and hold an OS lock on it for the whole run. A second run on it is refused; the OS
    drops the lock when the process dies (even by kill -9), so no stale lock is ever left behind."""
    if not is_main:
        yield
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, ".lock"), "w")
    except OSError as error:
        raise RunError(f"cannot use --run_dir {run_dir}: {error.strerror}; pass a writable directory") \
            from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"--run_dir {run_dir} is in use by another running train.py; wait for it "
                           "or pass another --run_dir") from None
        yield


def write_or_explain(write, path):
    """Run write(temporary path), then rename it over path: a crash or a full disk at any moment leaves
    the previous file intact, and a failure is one line that says so, whatever the writer raised (torch.save
    raises RuntimeError on a full disk, a tokenizer's save a plain Exception)."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except Exception as error:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise RunError(write_failure(error, path)) from None
    except BaseException:  # Ctrl-C too: never leave a half-written temporary file behind
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def write_failure(error, path):
    """The one line that explains why writing path failed, and what is left of the file it was to replace."""
    if os.path.isdir(path):
        return (f"could not write {path}: a directory of that name is in the way; move it aside and resume "
                "with --resume auto")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    directory = os.path.dirname(path) or "."
    with contextlib.suppress(OSError):
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or shutil.disk_usage(directory).free < 2 ** 20:
            reason = "no space left on the device"
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.isfile(path) else "nothing was written"
    hint = "free some disk space" if reason == "no space left on the device" else "check the directory"
    return f"could not write {path}: {reason}; {kept}; {hint} and resume with --resume auto"


def save_atomic(state, path):
    write_or_explain(lambda temporary: torch.save(state, temporary), path)


def copy_atomic(source, path):
    write_or_explain(lambda temporary: shutil.copyfile(source, temporary), path)


def write_lines_atomic(lines, path):
    """JSON lines (metrics.jsonl), replaced whole."""
    def write(temporary):
        with open(temporary, "w") as file:
            file.writelines(json.dumps(line) + "\n" for line in lines)
    write_or_explain(write, path)


def check_checkpoint_path(path, directory_hint=""):
    """Refuse a path that names no checkpoint file (train.py asks before it touches its run directory).
    directory_hint: what the message for a directory adds (train.py: how to resume a run directory)."""
    if os.path.isdir(path):
        raise RunError(f"{path} is a directory; name a checkpoint file in it (e.g. "
                       f"{os.path.join(path, 'last.pt')}){directory_hint}")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path}")


def load_checkpoint(path, map_location="cpu", required=CHECKPOINT_KEYS, directory_hint=""):
    """A checkpoint written by train.py, every field it holds checked (schema.py) before anything uses it.
    weights_only=True: a file carrying pickled code is refused, never run."""
    check_checkpoint_path(path, directory_hint)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise RunError(f"refusing to load {path}: it holds pickled Python objects, which could run code; "
                       "only checkpoints written by train.py load") from None
    except Exception as error:
        raise RunError(f"cannot read checkpoint {path}: truncated or corrupt "
                       f"({type(error).__name__})") from None
    missing = [key for key in required if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise RunError(f"{path} is not a checkpoint written by train.py (it lacks {', '.join(missing)})")
    schema.check_checkpoint(checkpoint, path)
    cfg = config_of(checkpoint, path)
    if "optimizer" in required and cfg.ema_decay:  # resuming an averaged run needs the trained weights too
        missing = [key for key in ("training_model", "ema_updates") if key not in checkpoint]
        if missing:
            raise RunError(f"{path} lacks {', '.join(missing)}, which a run with --ema_decay resumes from; "
                           f"{schema.DAMAGED}")
    for key in ("model", "training_model"):
        if key in checkpoint and join_self_attention_projections(checkpoint[key]):
            checkpoint["separate_self_attention_projections"] = True
    with torch.device("meta"):  # shapes only, no memory: an edited config must not allocate a model of its size
        model = build_model(cfg, *tokenizers_of(checkpoint, path))
    if "optimizer" in checkpoint and checkpoint.get("separate_self_attention_projections"):
        try:
            checkpoint["optimizer"] = join_optimizer_state(checkpoint["optimizer"], model)
        except (KeyError, IndexError, ValueError, RuntimeError):
            raise RunError(f"{path}: its optimizer state does not fit the model; {schema.DAMAGED}") from None
    schema.check_state_shapes(checkpoint, path, model, parameter_groups(cfg, model))
    return checkpoint


def build_model(cfg, src_tokenizer, tgt_tokenizer):
    return Transformer(src_tokenizer.get_vocab_size(), tgt_tokenizer.get_vocab_size(),
                       dataset.special_ids(tgt_tokenizer)["pad"], **{name: getattr(cfg, name) for name in MODEL_FIELDS})


def load_translator(path, device):
    """(model, src_tokenizer, tgt_tokenizer, config dict) from a self-contained checkpoint: what translate.py,
    export.py and bench.py decode with."""
    checkpoint = load_checkpoint(path, map_location=device)
    cfg = config_of(checkpoint, path)
    src_tokenizer, tgt_tokenizer = tokenizers_of(checkpoint, path)
    try:
        model = build_model(cfg, src_tokenizer, tgt_tokenizer)
        model.load_state_dict(checkpoint["model"])
    except (MemoryError, RuntimeError) as error:
        raise RunError(f"{path}: cannot load its model ({str(error).splitlines()[0][:120]})") from None
    return model.to(device).eval(), src_tokenizer, tgt_tokenizer, dataclasses.asdict(cfg)


def join_self_attention_projections(state_dict):
    """Checkpoints written before self-attention projected queries, keys and values in one product hold a
    query and a key_value matrix per self-attention: join them in place, rows of queries first (as
    model.Attention splits them). Returns whether there was anything to join."""
    separate = [key for key in state_dict if key.rpartition(".query.")[0].endswith("self_attn")]
    for key in separate:
        prefix, _, kind = key.rpartition(".query.")
        state_dict[f"{prefix}.query_key_value.{kind}"] = torch.cat([state_dict.pop(key),
                                                                   state_dict.pop(f"{prefix}.key_value.{kind}")])
    return bool(separate)


def join_optimizer_state(saved, model):
    """An optimizer state saved with separate self-attention projections, renumbered for `model`'s parameters:
    a joined query_key_value weight or bias takes its two parts' moments concatenated (AdamW works elementwise,
    so training goes on exactly as it would have). The saved numbering has the parts in the order their module
    registered them: query.weight, query.bias, key_value.weight, key_value.bias."""
    parts, saved_index = [], 0
    for name, _ in model.named_parameters():
        if name.endswith("query_key_value.weight"):
            parts.append([saved_index, saved_index + 2])
        elif name.endswith("query_key_value.bias"):
            parts.append([saved_index + 1, saved_index + 3])
            saved_index += 4
        else:
            parts.append([saved_index])
            saved_index += 1
    state = {}
    for index, part_indices in enumerate(parts):
        part_states = [saved["state"][i] for i in part_indices if i in saved["state"]]
        if part_states:
            state[index] = {key: torch.cat([part[key] for part in part_states])
                            if torch.is_tensor(value) and value.dim() else value  # "step" is one number
                            for key, value in part_states[0].items()}
    (group,) = saved["param_groups"]
    return {"state": state, "param_groups": [{**group, "params": list(range(len(parts)))}]}


def config_of(checkpoint, path):
    """The checkpoint's config, typed and checked as a run's flags are (fields it predates take PREDATED_FIELDS'
    values, or else today's defaults): a hand-edited or damaged one stops with one line instead of a traceback deep
    in the model."""
    saved = checkpoint["config"]
    needed = ("tokenizer", "lang_src", "lang_tgt", "d_model", "n_heads", "d_ff", "n_layers", "n_unique_layers",
              "share", "tie_embeddings")
    missing = [name for name in needed if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise RunError(f"{path}: its config lacks {', '.join(missing)}; {schema.DAMAGED}")
    known = {field.name for field in dataclasses.fields(Config)}
    return schema.check_config({**PREDATED_FIELDS, **{name: value for name, value in saved.items() if name in known}},
                               path)


def tokenizers_of(checkpoint, path):
    """The checkpoint's (source, target) tokenizers, each holding the special tokens training adds."""
    try:
        tokenizers = [Tokenizer.from_str(text) for text in checkpoint["tokenizers"]]
    except Exception:
        raise RunError(f"{path}: its tokenizers are not the JSON train.py writes; {schema.DAMAGED}") from None
    for side, tokenizer in zip(("source", "target"), tokenizers):
        if None in dataset.special_ids(tokenizer).values():
            raise RunError(f"{path}: its {side} tokenizer lacks the special tokens "
                           f"{', '.join(dataset.SPECIAL_TOKENS)}; {schema.DAMAGED}")
    return tokenizers


def load_for_resume(cfg, last_path, world_size, log):
    """(checkpoint, its path, cfg) for the checkpoint that --resume names (auto: run_dir's last.pt, if any),
    checked to fit this run, with the fields cfg leaves at auto taking the values the checkpoint was trained
    with (a run begun on a GPU resumes with its GPU-sized batches on a CPU); (None, None, cfg) for a fresh run."""
    resume_path = last_path if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and os.path.isdir(last_path):
        raise RunError(f"{last_path} is a directory, not a checkpoint; move it aside to continue or start the run")
    if cfg.resume == "auto" and not os.path.exists(last_path):
        log(f"resume: no {last_path} yet, starting a new run")
        return None, None, cfg
    if not resume_path:
        return None, None, cfg
    checkpoint = load_checkpoint(resume_path, required=CHECKPOINT_KEYS + RESUME_KEYS + PROGRESS_KEYS,
                                 directory_hint=RESUME_HINT)
    cfg = cfg.with_autos_from(saved_config(checkpoint))
    check_resumable(checkpoint, cfg, resume_path, world_size)
    log(f"resume: {resume_path} (epoch {checkpoint['epoch']}, batch {checkpoint['batch_in_epoch']}, "
        f"step {checkpoint['step']})")
    return checkpoint, resume_path, cfg


def claim_run_dir(run_dir, resume_path, overwrite, is_main):
    """A run that does not continue run_dir's own last.pt would replace the checkpoints of the run there at its
    first evaluation: refused, unless --overwrite true, which removes that run's checkpoints, metrics and
    TensorBoard logs first, so that nothing of it is mistaken for this one's."""
    own = [os.path.join(run_dir, name) for name in ("last.pt", "best.pt")]
    if resume_path and os.path.realpath(resume_path) == os.path.realpath(own[0]):
        return
    held = [path for path in own if os.path.exists(path)]
    if not held:
        return
    if not overwrite:
        step = saved_step(held[0])
        raise RunError(f"--run_dir {run_dir} holds another run ({os.path.basename(held[0])}"
                       f"{'' if step is None else f' at step {step:,}'}); continue it with --resume auto, train "
                       "anew in another --run_dir, or replace it with --overwrite true")
    if not is_main:
        return
    paths = [os.path.join(run_dir, name) for name in ["last.pt", "best.pt", "metrics.jsonl"]
             + sorted(name for name in os.listdir(run_dir) if name.startswith("events.out.tfevents."))]
    paths = [path for path in paths if os.path.lexists(path)]
    other = next((path for path in paths if os.path.islink(path) or not os.path.isfile(path)), None)
    if other:  # checked for all before any is removed
        raise RunError(f"--overwrite: {other} is not a file this project writes (a directory or a link); "
                       "--overwrite removes only the run's own files: move it away, or train in another --run_dir")
    for path in paths:
        try:
            os.remove(path)
        except OSError as error:
            raise RunError(f"--overwrite: could not remove {path}: {error.strerror}") from None


def check_same_data(checkpoint, data, path):
    """Refuse to resume on data whose text changed: the old tokenizers and a reshuffled split would quietly
    move former training pairs into validation, and a changed --eval_files set would change which pairs are
    left out of training and mix two sets in its metrics. (Checkpoints from before either fingerprint pass
    unchecked on it.)"""
    if (checkpoint.get("data_fingerprint", data.fingerprint) != data.fingerprint
            or checkpoint.get("eval_fingerprint", data.eval_fingerprint) != data.eval_fingerprint):
        raise RunError(f"the data has changed since {path} was written (the pairs in --data_files or "
                       "--eval_files, or the hub dataset, differ); resume with the data it was trained on, or start "
                       "a new --run_dir")


def best_first(line):
    """The key that ranks evaluations for best.pt, best first: the highest validation BLEU, then the lowest
    loss. The validation loss turns up about halfway through a run while BLEU still climbs, so the weights the
    loss picked translated 1-2 BLEU worse (docs/experiments.md, *Round nine*). Without translated sentences
    (--n_eval_sentences 0) the loss alone decides."""
    return -(line.get("bleu") or 0.0), line["val_loss"]


def repair_best(checkpoint, path, best_path):
    """best.pt holds the best evaluated weights. A stop between writing last.pt and copying it, or a finished
    run resumed into a new --run_dir, can leave it missing or stale: when the checkpoint being resumed is the
    best evaluated state so far, copy it there."""
    history = checkpoint["history"]
    if not history:
        return
    best = min(history, key=best_first)
    if best is not history[-1] or checkpoint["step"] != best["step"] or saved_step(best_path) == best["step"]:
        return
    copy_atomic(path, best_path)


def saved_step(path):
    """The step of the checkpoint at path, or None where there is none (or it cannot be read)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return None


def saved_config(checkpoint):
    """The config a checkpoint was trained with, fields it predates included (PREDATED_FIELDS)."""
    return {**PREDATED_FIELDS, **checkpoint["config"]}


def check_resumable(checkpoint, cfg, path, world_size):
    saved = saved_config(checkpoint)
    for name, value in dataclasses.asdict(cfg).items():
        if name == "data_files" and same_files(saved.get(name), value):
            continue  # the same files under another spelling; the content fingerprint guards what they hold
        if name not in RESUME_MAY_CHANGE and saved.get(name) != value:
            raise RunError(f"{path} was trained with --{name} {saved.get(name)} but this run has --{name} "
                           f"{value}; resume with the same value (the schedule, data and model must match) "
                           "or start a new --run_dir")
    if len(checkpoint["ranks"]) != world_size:
        raise RunError(f"{path} was written by a run of world size {len(checkpoint['ranks'])} but this "
                       f"run has world size {world_size}; resume with the same number of processes (torchrun "
                       "--nproc_per_node) because each process's data shard and the schedule length depend on it")


def same_files(saved, paths):
    """Whether two --data_files lists name the same files, in order (med.jsonl, ./med.jsonl, its absolute path)."""
    return (isinstance(saved, list) and len(saved) == len(paths)
            and all(os.path.realpath(a) == os.path.realpath(b) for a, b in zip(saved, paths)))


def restore(checkpoint, rank, model, optimizer, scheduler, scaler, average=None):
    """Load a checkpoint's training state, also on another device or precision than it was written on.
    With --ema_decay, "model" holds the averaged weights (those that translate) and "training_model" the
    trained ones."""
    model.load_state_dict(checkpoint.get("training_model", checkpoint["model"]))
    if average is not None:
        average.module.load_state_dict(checkpoint["model"])
        average.updates = checkpoint["ema_updates"]
    # load_state_dict copies the saved group options too; keep this run's kernel choice (fused on CUDA/CPU)
    kernel_options = [{k: group[k] for k in ("fused", "foreach", "capturable")} for group in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint["optimizer"])  # legacy numbering joined on load
    for group, options in zip(optimizer.param_groups, kernel_options):
        group.update(options)
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler.is_enabled() and checkpoint["scaler"]:  # a run without fp16 saved an empty scaler: start afresh
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng(checkpoint["ranks"][rank])


def rank_states(world_size, device, sums):
    """Every rank's RNG states and running epoch sums: a resumed run then draws the same dropout masks
    and reports the same epoch loss as an uninterrupted one. CUDA: this process's own device only."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
             "partial": dataclasses.asdict(sums)}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def save(state, path, is_main):
    """Rank 0 writes `state` (train.py's training_state: every rank took part in building it) to path, atomically."""
    if is_main:
        save_atomic(state, path)
