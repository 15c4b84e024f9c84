"""Sentence pairs from where they are kept: local files (.jsonl, .json, .tsv, .parquet; directories and globs
of them) or the Hugging Face hub, as lists (load_pairs, read_pairs) or as a stream (stream_pairs) that holds
one row at a time.

User mistakes (missing files, malformed lines, no usable pairs) raise errors.RunError with one line that names the
file and line; the scripts print it without a traceback.
"""
import glob
import itertools
import json
import os

from config import DATA_FILE_TYPES, is_text
from errors import RunError

def load_pairs(cfg):
    """(source, target) string pairs from local files (each must hold some) or the hub, the count of unusable
    rows dropped, and how many of the pairs each file gave, in order (the hub: one count)."""
    counts = []
    pairs = [pair for _, pair in stream_pairs(cfg, counts)]
    return pairs, sum(dropped for _, dropped in counts), [kept for kept, _ in counts]


def stream_pairs(cfg, counts):
    """(file number, (source, target)) of every usable pair of the run's data, in order, read as they are
    asked for. Appends (pairs kept, rows dropped) to `counts` as each file (or the hub dataset) ends; a file
    without a usable pair stops the stream with its name."""
    if cfg.data_files:
        sources = ((path, _read_rows(path, cfg.lang_src, cfg.lang_tgt)) for path in data_file_paths(cfg.data_files))
    else:
        name = f"Helsinki-NLP/{cfg.dataset}"
        rows = hub_rows(cfg.dataset, cfg.lang_src, cfg.lang_tgt)
        sources = [(name, ((f"{name} row {number}", row) for number, row in enumerate(rows, 1)))]
    for number, (origin, rows) in enumerate(sources):
        kept = dropped = 0
        for _, pair in _checked_pairs(rows, cfg.lang_src, cfg.lang_tgt):
            if pair is None:
                dropped += 1
                continue
            kept += 1
            yield number, pair
        if not kept:
            raise RunError(f"no usable {cfg.lang_src}-{cfg.lang_tgt} pairs in {origin} ({dropped} rows dropped)")
        counts.append((kept, dropped))


def data_file_paths(paths):
    """--data_files with each directory standing for the data files in it and each glob for the files it
    matches (both sorted by name), so that a corpus in shards trains as one."""
    expanded = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(DATA_FILE_TYPES))
            if not found:
                raise RunError(f"{path} is a directory without {', '.join(DATA_FILE_TYPES)} files")
        elif glob.has_magic(path):
            found = sorted(match for match in glob.glob(path, recursive=True)
                           if match.endswith(DATA_FILE_TYPES) and os.path.isfile(match))
            if not found:
                raise RunError(f"{path} matches no {', '.join(DATA_FILE_TYPES)} file")
        else:
            found = [path]
        expanded.extend(found)
    return expanded


def read_pairs(paths, src, tgt, strict=False):
    """(pairs, rows dropped) from local .jsonl (opus_books rows), .tsv (source<TAB>target) or .parquet files.
    strict: a row without a usable source and target stops with its file and line instead of being dropped,
    and the second item lists each pair's file and line instead (for messages about a pair)."""
    rows = (located for path in paths for located in _read_rows(path, src, tgt))
    pairs, wheres, dropped = _usable_pairs(rows, src, tgt, ", ".join(paths), strict)
    return pairs, wheres if strict else dropped


def _usable_pairs(rows, src, tgt, origin, strict=False):
    """rows: (where, row) with where naming the file and line (or the hub row) for error messages.
    Returns the pairs, where each came from, and the count of unusable rows dropped."""
    pairs, wheres, dropped = [], [], 0
    for where, pair in _checked_pairs(rows, src, tgt, strict):
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
            wheres.append(where)
    if not pairs:
        raise RunError(f"no usable {src}-{tgt} pairs in {origin} ({dropped} rows dropped)")
    return pairs, wheres, dropped


def _checked_pairs(rows, src, tgt, strict=False):
    """(where, pair) for each row, pair None for an unusable row (strict: an unusable row stops instead)."""
    for where, row in rows:
        pair = _pair_from_row(row, src, tgt)
        if pair is not None and not all(map(is_text, pair)):
            raise RunError(f"{where}: holds a lone surrogate escape (such as \\ud800), which is not text; "
                           "fix or remove the line")
        if pair is None and strict:
            raise RunError(f"{where}: needs a non-empty {src!r} source and {tgt!r} reference")
        yield where, pair


def _pair_from_row(row, src, tgt):
    """Rows follow the opus_books schema {"translation": {src: ..., tgt: ...}}; unusable rows give None."""
    translation = row.get("translation") if isinstance(row, dict) else None
    if not isinstance(translation, dict):
        return None
    source, target = translation.get(src), translation.get(tgt)
    if not (isinstance(source, str) and isinstance(target, str)):
        return None
    source, target = source.strip(), target.strip()
    return (source, target) if source and target else None


def check_data_file(path):
    """Refuse a path that names no data file of a kind read here (train.py asks before it touches its run
    directory)."""
    if not path.endswith(DATA_FILE_TYPES):
        raise RunError(f"{path}: expected a {', '.join(DATA_FILE_TYPES)} file (opus_books rows, or "
                       "source<TAB>target for .tsv)")
    if os.path.isdir(path):
        raise RunError(f"{path} is a directory; name the {', '.join(DATA_FILE_TYPES)} files in it")
    if not os.path.isfile(path):
        raise RunError(f"data file not found: {path}")


def _read_rows(path, src, tgt):
    check_data_file(path)
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    try:
        file = open(path, "rb")  # decoded line by line, so an encoding error names its line
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror}") from None
    with file:
        if path.endswith(".json") and file.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _json_array_rows(path, file)
            return
        file.seek(0)
        for number, raw in enumerate(file, 1):
            where = f"{path}:{number}"
            try:  # a UTF-8 byte-order mark is accepted, and so are Windows line endings
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise RunError(f"{where}: not UTF-8 (byte 0x{raw[error.start]:02x} at column "
                               f"{error.start + 1}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            if path.endswith(".tsv"):
                fields = line.split("\t")
                if len(fields) != 2:
                    raise RunError(f"{where}: expected source<TAB>target, found {len(fields)} fields")
                yield where, {"translation": {src: fields[0], tgt: fields[1]}}
            else:
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    raise RunError(f"{where}: malformed JSON ({error.msg})") from None
                except RecursionError:
                    raise RunError(f"{where}: malformed JSON (nested too deeply)") from None


def _json_array_rows(path, file):
    """A .json file holding one array of rows (what datasets' json loader also reads), rather than JSON lines."""
    file.seek(0)
    try:
        rows = json.loads(file.read().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise RunError(f"{path}: not UTF-8 (at byte {error.start}); convert the file to UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise RunError(f"{path}: malformed JSON ({getattr(error, 'msg', 'nested too deeply')}, line "
                       f"{getattr(error, 'lineno', '?')})") from None
    yield from ((f"{path} item {number}", row) for number, row in enumerate(rows, 1))


def _parquet_rows(path):
    """Rows of a Parquet file, read as it is now: the datasets library would serve a cached copy of a file
    replaced under the same path and modification time."""
    import pyarrow.parquet  # installed with datasets
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(f"{path}: not a readable Parquet file ({reason})") from None
    yield from ((f"{path} row {number}", row) for number, row in enumerate(rows, 1))


def hub_rows(name, src, tgt):
    import datasets
    import huggingface_hub
    # Without a network the hub client retries for a while and logs every retry; the user gets one line instead.
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()
    config = "-".join(sorted((src, tgt)))  # opus_books names its configs alphabetically, e.g. "en-fr"
    try:
        return datasets.load_dataset(f"Helsinki-NLP/{name}", config, split="train")
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunError(f"could not load Helsinki-NLP/{name} ({config}) from the Hugging Face hub ({reason}); "
                       "to train offline pass local files, e.g. `python train.py --data_files "
                       "tests/fixtures/pairs.jsonl --epochs 2` (a sample this repository ships), or any .jsonl of "
                       '{"translation": {"en": ..., "fr": ...}} lines') from None


def read_eval_files(cfg):
    """--eval_files as {name: pairs}, each named by its file (a number added where two names would clash)."""
    sets = {}
    for path in cfg.eval_files:
        name = base = os.path.splitext(os.path.basename(path))[0]
        for number in itertools.count(2):
            if name not in sets:
                break
            name = f"{base}_{number}"
        sets[name] = read_pairs([path], cfg.lang_src, cfg.lang_tgt)[0]
    return sets
