"""Files written atomically, and .npz checkpoints read without pickle or surprises.

Every file minidl writes goes to a temporary name beside its target, renamed over it only
once complete; the name carries the writer's process id, so that the next write in that
folder can delete what a killed process left. ``NpzReader`` reads each member's header on
opening, and its data only once the caller has checked it: a small file can claim
gigabytes. Object arrays (pickles) are refused: a checkpoint holds arrays, never code.
"""
import math
import os
import re
import secrets
import shutil
import stat
import tokenize
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy
from numpy.lib import format as npy

_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[0-9a-f]{8}\.tmp")


def temp_path(path):
    """A unique hidden name beside ``path`` for a file or folder being written."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def sweep_temp_files(folder):
    """Delete the temporary files and folders in ``folder`` of processes that have ended."""
    for entry in os.scandir(folder):
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and not _running(int(match[1])):
            try:
                (shutil.rmtree if entry.is_dir(follow_symlinks=False) else os.remove)(entry.path)
            except OSError:
                pass  # swept by another process first, or not ours to delete: leave it


def _running(pid):
    if os.name != "posix":  # os.kill would terminate the process there: never sweep
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    return pid > 0


@contextmanager
def atomic_write(path):
    """Yield a temporary path to write; if the block ends without an error, it is flushed
    to disk and renamed over ``path`` in one step, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(path.parent)
    tmp = temp_path(path)
    # Mode "x" creates it with the umask's permissions, as any new file (mkstemp would
    # give 0600, which the rename would keep).
    open(tmp, "xb").close()
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_regular(path, error=ValueError):
    """``path`` opened to read, as every file minidl reads, once fstat shows a regular file
    (O_NONBLOCK: a FIFO opens at once); else ``error``: a FIFO or /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        what = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder"}.get(kind, "a device")
        raise error(f"{os.fspath(path)!r} is {what}, not a regular file")
    return open(fd, "rb")


def save_npz(path, arrays):
    """Write ``arrays`` (name -> array) to ``path`` (.npz) atomically."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        numpy.savez(f, **{k: numpy.asarray(v) for k, v in arrays.items()})


def load_npz(path, expected):
    """``NpzReader(path).read_all(expected)``, closing the file."""
    with NpzReader(path) as npz:
        return npz.read_all(expected)


class NpzReader:
    """An .npz opened for checked reading; ``headers``: name -> (shape, dtype), from the
    member headers alone. Every problem is a CheckpointError (a ValueError) naming the
    file; FileNotFoundError when there is none."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"checkpoint {self.path!r} does not exist")
        self._file = open_regular(self.path, lambda why: CheckpointError(f"checkpoint {why}"))
        try:
            with self._reading():
                self._zip = zipfile.ZipFile(self._file)
                self.headers = dict(self._header(info) for info in self._zip.infolist())
                if len(self.headers) < len(self._zip.infolist()):   # zipfile reads the last
                    raise self.error("it holds two members of one name")
        except BaseException:
            self._file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def error(self, problem):
        return CheckpointError(f"checkpoint {self.path!r}: {problem}")

    def read(self, name, shape, dtype):
        """The array ``name``, after checking its header against ``shape`` and ``dtype``."""
        self.check(name, shape, dtype)
        with self._reading(), self._zip.open(f"{name}.npy") as f:
            return npy.read_array(f, allow_pickle=False)

    def read_all(self, expected):
        """{name: array} for ``expected`` (name -> (shape, dtype)), exactly these names;
        every header is checked before any data is read."""
        missing = sorted(set(expected) - set(self.headers))
        unexpected = sorted(set(self.headers) - set(expected))
        if missing or unexpected:
            raise self.error(f"missing arrays {missing}, unexpected arrays {unexpected}")
        for name, (shape, dtype) in expected.items():
            self.check(name, shape, dtype)
        return {name: self.read(name, *spec) for name, spec in expected.items()}

    def check(self, name, shape, dtype):
        """Same shape, and a dtype that casts within its kind (float64 into float32 yes,
        float into int no); a text member may not be longer than ``dtype`` allows."""
        if name not in self.headers:
            raise self.error(f"has no array {name!r}")
        saved_shape, saved = self.headers[name]
        dtype = numpy.dtype(dtype)
        castable = (saved.kind == "U" and saved.itemsize <= dtype.itemsize if dtype.kind == "U"
                    else numpy.can_cast(saved, dtype, "same_kind"))
        if saved_shape != tuple(shape) or not castable:
            raise self.error(f"array {name!r} is {saved} of shape {saved_shape}, expected "
                             f"{dtype} of shape {tuple(shape)}")

    def _header(self, info):
        """(name, (shape, dtype)) of a plain .npy member as long as its header says."""
        if not info.filename.endswith(".npy"):
            raise self.error(f"member {info.filename!r} is not an .npy array")
        if info.flag_bits & 0x1:
            raise self.error(f"member {info.filename!r} is encrypted")
        with self._zip.open(info) as f:
            version = npy.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise self.error(f"member {info.filename!r} has .npy version {version}")
            read_header = npy.read_array_header_1_0 if version == (1, 0) \
                else npy.read_array_header_2_0
            shape, _, dtype = read_header(f)
            size = f.tell() + math.prod(shape) * dtype.itemsize
        if dtype.hasobject:
            raise self.error(f"member {info.filename!r} holds Python objects (a pickle), "
                             f"which minidl never loads")
        if size != info.file_size:
            raise self.error(f"member {info.filename!r} holds {info.file_size} bytes, but "
                             f"its header says {size} ({dtype} of shape {shape})")
        return info.filename.removesuffix(".npy"), (shape, dtype)

    @contextmanager
    def _reading(self):
        """What zipfile and numpy raise on a damaged file, as one clear CheckpointError."""
        try:
            yield
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, KeyError, RuntimeError, TypeError,
                zlib.error, ValueError, SyntaxError, tokenize.TokenError) as exc:  # (or a header)
            raise self.error(f"it is corrupt, truncated or not an .npz written by minidl "
                             f"({type(exc).__name__}: {exc})") from None


class CheckpointError(ValueError):
    """What NpzReader raises for a file it refuses; the message names the file."""
