"""Export a checkpoint to CTranslate2, the engine fairseq, OpenNMT-py and Marian models are served with.

    python export.py --checkpoint runs/opus_books/last.pt --out runs/opus_books/ct2 [--quantization int8]
    python translate.py --engine ctranslate2 --model runs/opus_books/ct2 "I am tired."

The directory holds the engine's model (model.bin, config.json, vocabularies), the checkpoint's tokenizers and
decoding settings (translator.json) and a README on loading it. The model is described through
ctranslate2.specs: a pre-norm Transformer with ReLU feed-forward layers, the checkpoint's own sinusoidal table,
embeddings scaled by sqrt(d_model), fused query-key-value projections; shared layers are unrolled, each position
taking the weights of the block it uses. The directory is written whole or not at all.
"""
import argparse
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import tempfile

import torch
from tokenizers import Tokenizer

import dataset
import schema
from checkpoint import load_translator
from config import QUANTIZATIONS, OneLineParser, parse_bool
from errors import RunError, one_line_errors
from model import output_limits

SETTINGS_FILE = "translator.json"  # what translate.py needs beside the engine's files
EXPORT_FILES = {"model.bin", "config.json", "source_vocabulary.json", "target_vocabulary.json",
                "shared_vocabulary.json", "tokenizer_source.json", "tokenizer_target.json", SETTINGS_FILE, "README.md"}
STAGING_SUFFIX = ".staging"  # .<out's name>.<8 random characters>.staging, beside --out
CPU_BATCH_TOKENS = 1000  # source tokens a CPU worker decodes at once (x beam): measured in docs/experiments.md
README = """# A CTranslate2 model exported by export.py

From {checkpoint}, weights in {quantization}.

```python
import os, ctranslate2, tokenizers
translator = ctranslate2.Translator("{out}", device="cpu", compute_type="{compute_type}",
                                    inter_threads=os.cpu_count(), intra_threads=1)  # a worker per core
source = tokenizers.Tokenizer.from_file("{out}/tokenizer_source.json")
target = tokenizers.Tokenizer.from_file("{out}/tokenizer_target.json")
result = translator.translate_batch([source.encode("I am tired.", add_special_tokens=False).tokens], beam_size=4,
                                    max_batch_size=250, batch_type="tokens")
print(target.decode([target.token_to_id(token) for token in result[0].hypotheses[0]]))
```

`python translate.py --engine ctranslate2 --model {out} ...` translates text as the checkpoint does, with its
length limit (at most {max_len_a:g} x source tokens + {max_len_b}) and its input and output conventions.
"""


def model_spec(model, vocabularies, ids):
    """The ctranslate2.specs.TransformerSpec of this Transformer, its weights as numpy arrays."""
    from ctranslate2.specs import common_spec, transformer_spec
    spec = transformer_spec.TransformerSpec.from_config(
        (len(model.encoder_layers), len(model.decoder_layers)), model.encoder_layers[0].self_attn.n_heads,
        pre_norm=True, activation=common_spec.Activation.RELU)
    spec.config.layer_norm_epsilon = model.encoder_norm.eps
    for name, token in (("unk_token", "unk"), ("bos_token", "sos"), ("eos_token", "eos"),
                        ("decoder_start_token", "sos")):
        setattr(spec.config, name, vocabularies[1][ids[token]])
    spec.config.add_source_eos = True  # training appends EOS to every source

    def array(tensor):
        return tensor.detach().float().cpu().numpy()

    def linear(target, module):
        target.weight = array(module.weight)
        if module.bias is not None:
            target.bias = array(module.bias)

    def norm(target, module):
        target.gamma, target.beta = array(module.weight), array(module.bias)

    def feed_forward(target, block):
        norm(target.layer_norm, block.ff_norm)
        linear(target.linear_0, block.ff[0])
        linear(target.linear_1, block.ff[3])

    positions = array(model.positions)
    for side, embedding, layers, final_norm in (
            (spec.encoder, model.src_embed, model.encoder_layers, model.encoder_norm),
            (spec.decoder, model.tgt_embed, model.decoder_layers, model.decoder_norm)):
        (side.embeddings[0] if isinstance(side.embeddings, list) else side.embeddings).weight = array(embedding.weight)
        side.scale_embeddings = True
        side.position_encodings.encodings = positions
        norm(side.layer_norm, final_norm)
        for target, block in zip(side.layer, layers):  # shared blocks: every position gets its block's weights
            norm(target.self_attention.layer_norm, block.self_attn_norm)
            linear(target.self_attention.linear[0], block.self_attn.query_key_value)
            linear(target.self_attention.linear[1], block.self_attn.out)
            if side is spec.decoder:
                norm(target.attention.layer_norm, block.cross_attn_norm)
                linear(target.attention.linear[0], block.cross_attn.query)
                linear(target.attention.linear[1], block.cross_attn.key_value)
                linear(target.attention.linear[2], block.cross_attn.out)
            feed_forward(target.ffn, block)
    linear(spec.decoder.projection, model.output)
    spec.register_source_vocabulary(vocabularies[0])
    spec.register_target_vocabulary(vocabularies[1])
    return spec


def vocabulary(tokenizer):
    """The tokenizer's tokens in id order, as the engine takes a vocabulary."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    return [by_id[index] for index in range(tokenizer.get_vocab_size())]


class Stopped(BaseException):
    """A SIGINT or SIGTERM during an export, raised where the export stands so that its staging is removed."""


def export(checkpoint, out, quantization="float32", force=False):
    """Write the CTranslate2 directory `out` for this checkpoint: built and validated in a staging directory
    beside it, then renamed into place, so that a failure or a stop at any point leaves nothing behind."""
    require_engine()
    check_replaceable(out, checkpoint, force)
    model, src_tokenizer, tgt_tokenizer, cfg = load_translator(checkpoint, torch.device("cpu"))
    ids = dataset.special_ids(tgt_tokenizer)
    vocabularies = vocabulary(src_tokenizer), vocabulary(tgt_tokenizer)
    try:
        spec = model_spec(model, vocabularies, ids)
        spec.validate()
        spec.optimize(quantization=quantization)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise RunError(f"CTranslate2 cannot hold {checkpoint}'s model ({error}); nothing was written") from None
    parent, name = os.path.split(os.path.abspath(out))
    remove_stale_staging(parent, name)
    try:
        staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=STAGING_SUFFIX, dir=parent)
        lock = os.open(staging, os.O_RDONLY)  # held while this export lives: a later one leaves it alone
    except OSError as error:
        raise RunError(f"cannot write into {parent}: {error.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        spec.save(staging)
        src_tokenizer.save(os.path.join(staging, "tokenizer_source.json"))
        tgt_tokenizer.save(os.path.join(staging, "tokenizer_target.json"))
        settings = {"tokenizer": cfg["tokenizer"], "max_len_a": cfg["max_len_a"],
                    "max_len_b": cfg["max_len_b"], "max_positions": cfg["max_positions"],
                    "lang_src": cfg["lang_src"], "lang_tgt": cfg["lang_tgt"], "quantization": quantization,
                    "checkpoint": os.path.abspath(checkpoint)}
        with open(os.path.join(staging, SETTINGS_FILE), "w") as file:
            json.dump(settings, file, indent=1)
        with open(os.path.join(staging, "README.md"), "w") as file:
            file.write(README.format(out=out, compute_type=compute_type(quantization), **settings))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # a temporary directory is private; the model directory is not
        if os.path.isdir(out):
            remove_export(out)
        os.rename(staging, out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(error, Exception):  # a stop (Stopped, KeyboardInterrupt) stays one
            raise
        raise RunError(f"could not write {out} ({reason_of(error)}); nothing of it was left behind") from None
    finally:
        os.close(lock)
    return out


def check_replaceable(out, checkpoint, force):
    """Refuse, before any work, an --out that exists, unless --force and it is a directory export() wrote: its
    files and nothing else. The working directory, the checkpoint's directory and every directory above either
    are refused whatever they hold."""
    if not os.path.lexists(out):
        return
    if not force:
        raise RunError(f"--out {out} exists; name a new directory, or pass --force true to replace an export")
    real = os.path.realpath(out)
    for held, what in ((os.getcwd(), "the working directory"),
                       (os.path.dirname(os.path.realpath(checkpoint)), f"the directory of {checkpoint}")):
        if os.path.commonpath([real, held]) == real:
            raise RunError(f"--out {out} is or holds {what}; --force replaces only a directory export.py wrote: "
                           "name a new directory")
    if os.path.islink(out) or not os.path.isdir(out):
        raise RunError(f"--out {out} is not a directory export.py wrote; --force replaces only such a directory: "
                       "name a new directory")
    foreign = foreign_entries(out)
    if foreign:
        raise RunError(f"--out {out} holds what export.py does not write ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); --force replaces only a directory export.py wrote: "
                       "name a new directory, or move those away")


def foreign_entries(directory):
    """The names in directory that export() does not write as regular files."""
    return sorted(name for name in os.listdir(directory) if name not in EXPORT_FILES
                  or os.path.islink(os.path.join(directory, name)) or not os.path.isfile(os.path.join(directory, name)))


def remove_export(directory):
    """Delete a directory export() wrote, file by file: anything else in it stops the deletion (rmdir fails)."""
    for name in os.listdir(directory):
        if name in EXPORT_FILES:
            os.remove(os.path.join(directory, name))
    os.rmdir(directory)


def remove_stale_staging(parent, name):
    """Remove staging directories of exports to parent/name that died without cleaning up (SIGKILL, a power cut):
    those that no live export holds locked, and that hold only files export() writes."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[^.]{{8}}{re.escape(STAGING_SUFFIX)}")
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if not pattern.fullmatch(entry) or os.path.islink(path) or not os.path.isdir(path) or foreign_entries(path):
            continue
        try:
            lock = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove_export(path)
        except OSError:  # a live export's (locked), or one that cannot be removed: left as it is
            pass
        finally:
            os.close(lock)


def require_engine():
    """The ctranslate2 module, or one line on how to install it (requirements.txt lists it)."""
    try:
        import ctranslate2
    except ImportError:
        raise RunError("CTranslate2 is not installed: pip install ctranslate2") from None
    return ctranslate2


class Engine:
    """A directory export() wrote, loaded in CTranslate2: translates token ids as model.translate does, with its
    length limits (output_limits), so that both engines take the same inputs and give comparable outputs.
    On a CPU it runs `threads` (default: PyTorch's thread count) single-threaded workers, each decoding its own
    batch (CTranslate2's inter_threads): small decoding steps keep one core busy better than they split over two."""

    def __init__(self, directory, device, int8=False, threads=0):
        ctranslate2 = require_engine()
        try:
            with open(os.path.join(directory, SETTINGS_FILE)) as file:
                self.settings = json.load(file)
            with open(os.path.join(directory, "config.json")) as file:
                engine_config = json.load(file)
            self.tokenizers = [Tokenizer.from_file(os.path.join(directory, f"tokenizer_{side}.json"))
                               for side in ("source", "target")]
        except Exception as error:  # a missing or unreadable file: OSError, JSON's ValueError, the tokenizer's
            raise RunError(f"--model {directory}: not a model directory export.py wrote ({reason_of(error)})") from None
        schema.check_exported(directory, self.settings, engine_config)
        try:
            compute = "int8" if int8 else compute_type(self.settings["quantization"]) if device.type == "cpu" else \
                "default"
            torch_threads = torch.get_num_threads()
            workers = dict(inter_threads=threads or torch_threads, intra_threads=1) if device.type == "cpu" else {}
            self.translator = ctranslate2.Translator(directory, device=device.type, compute_type=compute, **workers)
            # the engine sets the calling thread's OpenMP threads to intra_threads, and PyTorch shares that count
            torch.set_num_threads(torch_threads)
        except Exception as error:  # a missing or damaged model.bin, the engine's RuntimeError
            raise RunError(f"--model {directory}: not a model directory export.py wrote ({reason_of(error)})") from None
        self.batch_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else None
        self.max_positions = self.settings["max_positions"]
        self.source_tokens = vocabulary(self.tokenizers[0])
        self.target_ids = {token: index for index, token in enumerate(vocabulary(self.tokenizers[1]))}

    def translate(self, sources, beam=1, alpha=0.6, max_len_a=1.2, max_len_b=10, max_len=0, max_tokens=6000):
        """Token-id lists (no specials) to token-id lists, in input order. Greedy search is one call, each
        output cut to its own length limit (exact: a greedy continuation does not depend on the limit); beam
        search is one call per source length, so that each sentence keeps its limit; all calls are queued at
        once for the workers. CTranslate2 sorts each call's sentences by length and batches them by source
        tokens (x beam). Its beam search ranks finished hypotheses by log P / |Y| ** alpha, model.beam_search
        by GNMT's penalty."""
        limits = output_limits(torch.tensor([len(ids) + 1 for ids in sources], dtype=torch.long), max_len_a,
                               max_len_b, max_len, self.max_positions).tolist()
        groups = {}
        for index, limit in enumerate(limits):
            groups.setdefault(limit if beam > 1 else max(limits), []).append(index)
        batch_tokens = max(1, min(max_tokens, self.batch_tokens or max_tokens) // beam)
        queued = [(indices, self.translator.translate_batch(
            [[self.source_tokens[token] for token in sources[index]] for index in indices], beam_size=beam,
            length_penalty=alpha, max_decoding_length=limit, min_decoding_length=1, max_input_length=0,
            batch_type="tokens", max_batch_size=batch_tokens, asynchronous=True)) for limit, indices in groups.items()]
        results = [None] * len(sources)
        for indices, outputs in queued:
            for index, output in zip(indices, outputs):
                results[index] = [self.target_ids[token] for token in output.result().hypotheses[0][:limits[index]]]
        return results


def reason_of(error):
    """An exception's first line, or an OSError's reason."""
    return getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]


def compute_type(quantization):
    """The engine's compute type for weights saved in `quantization`: float16 weights compute in float32 on a CPU."""
    return {"float16": "float32"}.get(quantization, quantization)


@one_line_errors
def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train.py")
    parser.add_argument("--out", required=True, help="the CTranslate2 model directory to write")
    parser.add_argument("--quantization", default="float32", choices=QUANTIZATIONS,
                        help="weight type (int8: about 4x smaller and faster on a CPU)")
    parser.add_argument("--force", type=parse_bool, default=False, metavar="true|false",
                        help="replace --out if it is a directory export.py wrote")
    args = parser.parse_args(argv)

    def stop(signum, frame):
        raise Stopped(signum)

    handlers = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        out = export(args.checkpoint, args.out, args.quantization, args.force)
    except Stopped as stopped:
        signum = stopped.args[0]
        print(f"export: stopped by {signal.Signals(signum).name}; nothing of {args.out} was written", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    print(f"exported {args.checkpoint} to {out} ({args.quantization}, "
          f"{sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out)) / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
