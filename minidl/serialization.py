"""Saving arrays to .npz atomically, and reading them back without pickle.

A checkpoint is written to a temporary file in the same folder and renamed over
the target only once complete, so a crash never leaves a half-written file. It is
read with ``allow_pickle=False``: a checkpoint can hold arrays, never code.
"""
import os
import secrets
import zipfile

import numpy


def save_npz(path, arrays):
    """Write ``arrays`` (name -> array) to ``path`` (.npz) atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A unique hidden name; mode "x" creates it with the umask's permissions, as any
    # new file (mkstemp would give 0600, which the rename would keep).
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}."
                               f"{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            numpy.savez(f, **{k: numpy.asarray(v) for k, v in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_npz(path):
    """Read every array of an .npz into a dict; ValueError for a missing, corrupt,
    truncated or pickled file, naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with numpy.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read checkpoint {path!r}: it is corrupt, truncated or not "
                         f"an .npz written by minidl ({type(exc).__name__}: {exc})") from exc
