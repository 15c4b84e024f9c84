"""What is read back from disk is input too: every field of a checkpoint (last.pt, best.pt) and of an exported model
directory (translator.json, the engine's config.json) is checked for its type and range on load, before any data is
prepared or any model is built, so that a file from another version, a half-synced copy or a hand edit stops with
one line naming the file, the field and what was expected.

checkpoint.py and export.Engine load through these checks; they know nothing of training.
"""
import math
import random
import re

import torch

from config import FIELD_BOUNDS, NAME_PATTERN, QUANTIZATIONS, Config, shown
from dataset import EOS, SOS, UNK
from errors import RunError

LIMIT = 2 ** 53  # the most any count or number of seconds may be: exact in a float, far beyond any run
DAMAGED = "the checkpoint was edited or is damaged"
EPOCH_SUMS = ("loss", "tokens", "real_tokens", "seconds", "skipped")  # what a rank's running sums hold
SCALER_FIELDS = {"scale": (1e-30, LIMIT), "growth_factor": (1, LIMIT), "backoff_factor": (1e-30, 1),
                 "growth_interval": (1, LIMIT), "_growth_tracker": (0, LIMIT)}  # GradScaler.state_dict()


class Mismatch(Exception):
    """A field that is not what was expected; the loader names the file."""


def described(value):
    """A stored value as a message shows it: scalars as they are, containers and tensors by their kind."""
    if torch.is_tensor(value):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {shape_text(value.shape)}"
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__} of {len(value)} entries"
    return shown(value)


def shape_text(shape):
    return "x".join(map(str, shape)) or "()"


def require(ok, where, value, expected):
    if not ok:
        raise Mismatch(f"{where} is {described(value)}, not {expected}")


def number(value, where, low=0, high=LIMIT, whole=False):
    """A finite int (whole) or int or float within [low, high]; bool is neither."""
    kind = type(value) is int if whole else type(value) in (int, float)
    require(kind and math.isfinite(value) and low <= value <= high, where, value,
            f"{'a whole number' if whole else 'a finite number'} from {low:,} to {high:,}")


def count(value, where, low=0):
    number(value, where, low, whole=True)


def flag(value, where):
    require(type(value) is bool, where, value, "true or false")


def entries(value, where, kind=dict):
    require(isinstance(value, dict) if kind is dict else type(value) is kind, where, value, f"a {kind.__name__}")
    return value.items() if kind is dict else enumerate(value)


def keys(value, where, names):
    """value is a dict holding every one of names."""
    entries(value, where)
    missing = [name for name in names if name not in value]
    require(not missing, where, value, f"a dict holding {', '.join(missing)}")


def weights(value, where):
    for name, tensor in entries(value, where):
        require(type(name) is str and torch.is_tensor(tensor), f"{where}[{shown(name)}]", tensor, "a tensor")
        require(not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()), f"{where}[{name}]", tensor,
                "a tensor of finite values")


def optimizer_state(value, where):
    keys(value, where, ("state", "param_groups"))
    for index, moments in entries(value["state"], f"{where}.state"):
        require(type(index) is int, f"{where}.state", index, "a parameter's index")
        for name, moment in entries(moments, f"{where}.state[{index}]"):
            if torch.is_tensor(moment) and moment.dim() == 0:
                moment = moment.item()
            if name == "step":
                number(moment, f"{where}.state[{index}].step")
            else:
                require(torch.is_tensor(moment), f"{where}.state[{index}].{name}", moment, "a tensor")
    require(len(value["param_groups"]) > 0 if type(value["param_groups"]) is list else False,
            f"{where}.param_groups", value["param_groups"], "a list of one or more parameter groups")
    for number_of_group, group in entries(value["param_groups"], f"{where}.param_groups", list):
        at = f"{where}.param_groups[{number_of_group}]"
        keys(group, at, ("params", "lr", "betas", "eps", "weight_decay"))
        for index, parameter in entries(group["params"], f"{at}.params", list):
            count(parameter, f"{at}.params[{index}]")
        for name in ("lr", "eps", "weight_decay", "initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum"):
            if name in group:
                number(group[name], f"{at}.{name}")
        require(type(group["betas"]) in (tuple, list) and len(group["betas"]) == 2, f"{at}.betas", group["betas"],
                "two numbers")
        for index, beta in enumerate(group["betas"]):
            number(beta, f"{at}.betas[{index}]", high=1)


def scheduler_state(value, where):
    keys(value, where, ("total_steps", "last_epoch", "base_lrs", "_schedule_phases"))
    count(value["total_steps"], f"{where}.total_steps", low=1)
    number(value["last_epoch"], f"{where}.last_epoch", low=-1, high=value["total_steps"], whole=True)
    for name in ("base_lrs", "_last_lr"):
        for index, rate in entries(value.get(name, []), f"{where}.{name}", list):
            number(rate, f"{where}.{name}[{index}]")
    for index, phase in entries(value["_schedule_phases"], f"{where}._schedule_phases", list):
        keys(phase, f"{where}._schedule_phases[{index}]", ("end_step", "start_lr", "end_lr"))
        number(phase["end_step"], f"{where}._schedule_phases[{index}].end_step", low=-LIMIT)  # short runs: < 0
        for name, text in phase.items():
            require(name == "end_step" or type(text) is str, f"{where}._schedule_phases[{index}].{name}", text,
                    "the name of a parameter group's option")
    if "_step_count" in value:
        count(value["_step_count"], f"{where}._step_count")
    if "cycle_momentum" in value:
        flag(value["cycle_momentum"], f"{where}.cycle_momentum")


def scaler_state(value, where):
    """{} (a run without fp16) or GradScaler's state."""
    for name, scale in entries(value, where):
        require(name in SCALER_FIELDS, f"{where}[{shown(name)}]", scale, "a field of GradScaler's state")
        low, high = SCALER_FIELDS[name]
        number(scale, f"{where}.{name}", low, high, whole=name in ("growth_interval", "_growth_tracker"))


def history(value, where):
    for index, line in entries(value, where, list):
        keys(line, f"{where}[{index}]", ("step", "val_loss"))
        for name, metric in line.items():
            require(type(name) is str and (metric is None or type(metric) in (int, float, str, bool)),
                    f"{where}[{index}].{name}", metric, "a number, a string or null")
        count(line["step"], f"{where}[{index}].step")
        require(type(line["val_loss"]) in (int, float), f"{where}[{index}].val_loss", line["val_loss"], "a number")


def rank_states(value, where):
    require(type(value) is list and len(value) > 0, where, value, "a list of one entry per rank")
    for rank, state in enumerate(value):
        at = f"{where}[{rank}]"
        keys(state, at, ("python", "torch", "cuda", "partial"))
        try:
            random.Random().setstate(state["python"])
            python = True
        except (TypeError, ValueError, OverflowError):
            python = False
        require(python, f"{at}.python", state["python"], "Python's random state")
        require(torch_rng_state(state["torch"]), f"{at}.torch", state["torch"], "PyTorch's random state")
        require(state["cuda"] is None or (torch.is_tensor(state["cuda"]) and state["cuda"].dtype == torch.uint8
                                          and state["cuda"].dim() == 1), f"{at}.cuda", state["cuda"],
                "null or CUDA's random state")
        keys(state["partial"], f"{at}.partial", EPOCH_SUMS)
        for name, total in state["partial"].items():
            number(total, f"{at}.partial.{name}")


def torch_rng_state(state):
    if not torch.is_tensor(state) or state.dtype != torch.uint8 or state.dim() != 1:
        return False
    try:
        torch.Generator().set_state(state)
    except RuntimeError:
        return False
    return True


def digest(value, where):
    require(type(value) is str and re.fullmatch("[0-9a-f]{64}", value) is not None, where, value,
            "a SHA-256 digest (64 hexadecimal digits)")


def two_texts(value, where):
    require(type(value) is list and len(value) == 2 and all(type(text) is str for text in value), where, value,
            "a list of two tokenizers' JSON texts")


CHECKPOINT_FIELDS = {
    "model": weights, "training_model": weights, "ema_updates": count, "optimizer": optimizer_state,
    "scheduler": scheduler_state, "scaler": scaler_state, "total_steps": lambda value, where: count(value, where, 1),
    "epoch": count, "batch_in_epoch": count, "step": count, "history": history, "elapsed_seconds": number,
    "train_seconds": number, "calibrated": flag, "ranks": rank_states, "config": entries,
    "data_fingerprint": digest, "eval_fingerprint": digest, "tokenizers": two_texts}


def damaged(path, mismatch):
    return RunError(f"{path}: {mismatch}; {DAMAGED}")


def check_checkpoint(checkpoint, path):
    """Every field the checkpoint holds has its type and range, and the counters agree with one another.
    Which fields must be there is the loader's call (translating needs fewer than resuming)."""
    try:
        for name, check in CHECKPOINT_FIELDS.items():
            if name in checkpoint:
                check(checkpoint[name], name)
        if "step" not in checkpoint:  # a best.pt stripped for translating: nothing to relate
            return
        step = checkpoint["step"]
        total = checkpoint.get("total_steps", LIMIT)
        require(step <= total, "step", step, f"a step within total_steps ({total:,})")
        for index, line in enumerate(checkpoint.get("history", [])):
            require(line["step"] <= step, f"history[{index}].step", line["step"],
                    f"a step already taken (the checkpoint is at step {step:,})")
    except Mismatch as mismatch:
        raise damaged(path, mismatch) from None


def check_config(saved, path):
    """The stored config, typed as the command line types flags (bool, int and float kept apart: an int field's
    32.0 is refused) and validated as they are; returns the Config."""
    try:
        return Config.from_stored(saved)
    except (TypeError, ValueError) as error:
        raise damaged(path, f"its config is not valid ({error})") from None


def check_state_shapes(checkpoint, path, model, parameter_groups):
    """The weights, the optimizer's moments and the schedule's rates have the shapes and counts that `model` (built
    from the checkpoint's config on the meta device) and its optimizer's `parameter_groups` imply."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    parameters = [tuple(parameter.shape) for group in parameter_groups for parameter in group["params"]]
    try:
        for key in ("model", "training_model"):
            if key in checkpoint:
                saved = checkpoint[key]
                for name, tensor in saved.items():
                    require(name not in expected or tuple(tensor.shape) == expected[name], f"{key}[{name}]", tensor,
                            f"a tensor of shape {shape_text(expected.get(name, ()))} (the model its config describes)")
                missing = next((name for name in expected if name not in saved), None)
                require(missing is None, f"{key}[{missing}]", "missing", "there (the model its config describes has it)")
                extra = next((name for name in saved if name not in expected), None)
                require(extra is None, f"{key}[{extra}]", saved.get(extra), "absent (the model its config describes "
                        "has no such weight)")
        if "optimizer" in checkpoint:
            groups = checkpoint["optimizer"]["param_groups"]
            require(len(groups) == len(parameter_groups), "optimizer.param_groups", groups,
                    f"{len(parameter_groups)} parameter group(s), as --decay_norms_and_biases in its config implies")
            indices = sorted(index for group in groups for index in group["params"])
            require(indices == list(range(len(parameters))), "optimizer.param_groups", groups,
                    f"groups numbering the model's {len(parameters)} parameters once each")
            for index, moments in checkpoint["optimizer"]["state"].items():
                require(index < len(parameters), "optimizer.state", index, "a parameter's index")
                for name, moment in moments.items():
                    require(name == "step" or tuple(moment.shape) == parameters[index],
                            f"optimizer.state[{index}].{name}", moment,
                            f"a tensor of shape {shape_text(parameters[index])} (its parameter's)")
            if "scheduler" in checkpoint:
                for name in ("base_lrs", "_last_lr"):
                    rates = checkpoint["scheduler"].get(name, [None] * len(groups))
                    require(len(rates) == len(groups), f"scheduler.{name}", rates, "one rate per parameter group")
    except Mismatch as mismatch:
        raise damaged(path, mismatch) from None


def check_exported(directory, settings, engine_config):
    """translator.json (what export.py writes beside the engine's files) and the engine's config.json hold what
    export.py writes: decoding settings within config.py's bounds, and the special tokens the model was trained
    with."""
    try:
        keys(settings, "translator.json", ("tokenizer", "max_len_a", "max_len_b", "max_positions", "lang_src",
                                           "lang_tgt", "quantization", "checkpoint"))
        require(settings["tokenizer"] in ("word", "bpe"), "translator.json tokenizer", settings["tokenizer"],
                "word or bpe")
        number(settings["max_len_a"], "translator.json max_len_a", *FIELD_BOUNDS["max_len_a"])
        for name in ("max_len_b", "max_positions"):
            number(settings[name], f"translator.json {name}", *FIELD_BOUNDS[name], whole=True)
        for name in ("lang_src", "lang_tgt"):
            require(type(settings[name]) is str and re.fullmatch(NAME_PATTERN, settings[name]) is not None,
                    f"translator.json {name}", settings[name], "a language key")
        require(settings["quantization"] in QUANTIZATIONS, "translator.json quantization", settings["quantization"],
                f"one of {', '.join(QUANTIZATIONS)}")
        require(type(settings["checkpoint"]) is str, "translator.json checkpoint", settings["checkpoint"],
                "the path of the checkpoint it was exported from")
        written = {"add_source_bos": False, "add_source_eos": True, "bos_token": SOS, "decoder_start_token": SOS,
                   "eos_token": EOS, "unk_token": UNK}
        keys(engine_config, "config.json", [*written, "layer_norm_epsilon"])
        if "multi_query_attention" in engine_config:  # written by CTranslate2 releases that have it
            written["multi_query_attention"] = False
        for name, value in written.items():
            require(engine_config[name] == value and type(engine_config[name]) is type(value), f"config.json {name}",
                    engine_config[name], f"{shown(value)}, as export.py writes it")
        number(engine_config["layer_norm_epsilon"], "config.json layer_norm_epsilon", 1e-30, 1)
    except Mismatch as mismatch:
        raise RunError(f"--model {directory}: {mismatch}; the directory was edited or is damaged") from None
