"""Prepared data on disk: flat token-id arrays and a JSON description, memory-mapped when read, so that a run's
memory and start-up stop growing with the corpus and every process (each DDP rank, each later run) maps one copy.

An entry is a directory named by its key (a digest of the data's content and of every setting that shapes the
ids). It is written under a lock into a staging directory and renamed into place whole, its description last:
an entry that exists is complete. Every array's size and digest is checked when the entry is opened; a damaged
entry is removed and prepared again, never trained on.

Knows nothing about tokenizers, the model or where the pairs came from: dataset.py decides what goes in.
"""
import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import uuid

import numpy as np

from errors import RunError

FORMAT = 1  # raised whenever what an entry holds changes, so that older entries are prepared again
DESCRIPTION = "prepared.json"
STAGING = ".staging-"  # prefix of an entry being written


def cache_root(setting):
    """--data_cache auto: beside other caches, in $XDG_CACHE_HOME (or ~/.cache); else the directory given."""
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "transformer-en-fr", "data")


def file_digest(path):
    """The sha256 of a file's bytes, read in blocks (memory does not grow with the file)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()


def key_of(parts):
    """The entry's name: a digest of everything that shapes what the entry holds."""
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True).encode()).hexdigest()[:32]


def _cannot_write(root, error):
    reason = "no space left on the device" if error.errno == errno.ENOSPC else error.strerror or str(error)
    return RunError(f"cannot write the data cache in {root} ({reason}); free space there, point --data_cache at "
                    "another directory, or pass --data_cache off to keep the data in memory")


@contextlib.contextmanager
def locked(root, key, log):
    """Hold the key's lock: one process prepares an entry while others with the same key wait, then reuse it.
    The OS drops the lock when its holder dies, even by kill -9."""
    try:
        os.makedirs(root, exist_ok=True)
        handle = open(os.path.join(root, f"{key}.lock"), "a")
    except OSError as error:
        raise _cannot_write(root, error) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: another run is preparing the same data in {root}; waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def open_entry(root, key, log):
    """(description, arrays memory-mapped read-only) of a complete, undamaged entry, or None. A damaged one is
    said, removed and None returned (call with the key's lock held)."""
    path = os.path.join(root, key)
    if not os.path.isdir(path):
        return None
    try:
        with open(os.path.join(path, DESCRIPTION), "rb") as file:
            description = json.loads(file.read())
        arrays = {}
        for name, (dtype, length, digest) in description["arrays"].items():
            array_path = os.path.join(path, f"{name}.bin")
            size = os.path.getsize(array_path)
            if size != length * np.dtype(dtype).itemsize:
                raise ValueError(f"{name}.bin holds {size:,} bytes, not {length * np.dtype(dtype).itemsize:,}")
            if file_digest(array_path) != digest:
                raise ValueError(f"{name}.bin does not match its digest")
            arrays[name] = (np.memmap(array_path, dtype=dtype, mode="r", shape=(length,)) if length
                            else np.zeros(0, dtype=dtype))
    except (OSError, ValueError, KeyError, TypeError, RunError) as error:
        log(f"data: the cache entry {path} is damaged ({error}); preparing it again")
        shutil.rmtree(path, ignore_errors=True)
        return None
    return description, arrays


class Staging:
    """An entry being written: arrays appended chunk by chunk to files in a staging directory, which `publish`
    renames into place. Entries left behind by a process that died while preparing are removed first."""

    def __init__(self, root, key):
        self.root, self.key = root, key
        self.path = os.path.join(root, f"{STAGING}{key}-{uuid.uuid4().hex[:8]}")
        for name in os.listdir(root):
            if name.startswith(f"{STAGING}{key}-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        self.files, self.dtypes, self.lengths = {}, {}, {}
        self._guarded(os.makedirs, self.path)

    def _guarded(self, write, *args):
        try:
            return write(*args)
        except OSError as error:
            raise _cannot_write(self.root, error) from None

    def append(self, name, values, dtype):
        """Add values to the array `name` (created on first use, of this dtype)."""
        if name not in self.files:
            self.files[name] = self._guarded(open, os.path.join(self.path, f"{name}.bin"), "wb")
            self.dtypes[name], self.lengths[name] = np.dtype(dtype), 0
        values = np.asarray(values, dtype=self.dtypes[name])
        self._guarded(self.files[name].write, values.tobytes())
        self.lengths[name] += len(values)

    def read(self, name):
        """The array `name` as written so far, memory-mapped."""
        self._guarded(self.files[name].flush)
        if not self.lengths[name]:
            return np.zeros(0, dtype=self.dtypes[name])
        return np.memmap(self.files[name].name, dtype=self.dtypes[name], mode="r", shape=(self.lengths[name],))

    def read_bytes(self, name):
        """The uint8 array `name` as written so far, memory-mapped as bytes (slicing one gives bytes, cheaply)."""
        self._guarded(self.files[name].flush)
        if not self.lengths[name]:
            return b""
        with open(self.files[name].name, "rb") as file:
            return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def drop(self, name):
        """Forget and delete the array `name` (scratch that the entry does not keep)."""
        self._guarded(self.files.pop(name).close)
        self._guarded(os.remove, os.path.join(self.path, f"{name}.bin"))
        del self.dtypes[name], self.lengths[name]

    def publish(self, description):
        """Write the description (with each array's dtype, length and digest), sync, and rename into place."""
        def write():
            for file in self.files.values():
                file.flush()
                os.fsync(file.fileno())
                file.close()
            arrays = {name: (self.dtypes[name].str, self.lengths[name],
                             file_digest(os.path.join(self.path, f"{name}.bin"))) for name in self.files}
            with open(os.path.join(self.path, DESCRIPTION), "w") as file:
                json.dump({**description, "arrays": arrays}, file)
                file.flush()
                os.fsync(file.fileno())
            os.rename(self.path, os.path.join(self.root, self.key))
        self._guarded(write)

    def discard(self):
        for file in self.files.values():
            with contextlib.suppress(OSError):  # a full disk fails the close's flush too
                file.close()
        shutil.rmtree(self.path, ignore_errors=True)
