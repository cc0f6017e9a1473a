"""Files: atomic writes (a reader never sees a half-written file under its final name), JSON files
that record a checksum of their content, and checked reads of them (one line naming the file)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from nulltext.errors import FileError

log = logging.getLogger(__name__)

# The key under which a JSON file written by :func:`atomic_write_json` records the sha256 of the rest.
CHECKSUM = "sha256"
NUMBER = (int, float)  # JSON numbers (bools are refused separately: True is an int to Python)


def _umask() -> int:
    """The process's umask: Linux states it in /proc; elsewhere it is set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_error(what: str, folder: Path, error: OSError) -> FileError:
    """One line for ``error``, raised while writing into ``folder``; ``what`` says what failed."""
    blocker = next((p for p in [*reversed(folder.parents), folder] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return FileError(f"{what}: {blocker} is a file where a folder goes; move it away or write elsewhere")
    if isinstance(error, IsADirectoryError):
        return FileError(f"{what}: a folder stands where the file goes; move it away or write elsewhere")
    return FileError(f"{what}: {error.strerror or error}; write into a folder you can write to, with free space")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic, so a killed process leaves either the old file or the new one, plus at
    worst a hidden ``.<name>.*.tmp``. The data is flushed to disk (fsync) before the rename, so
    after a power cut the name does not point at an empty file either. The file gets the mode a
    plain ``open`` would give it (0644 under umask 022; the temporary file is created 0600). A
    folder that cannot be written (read-only, full, a file in the way) is a :class:`FileError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _write_error(f"cannot write {path}", path.parent, error) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_error(f"cannot write {path}", path.parent, error) from None
        raise
    return path


def check_writable_folder(folder: str | os.PathLike, setting: str, subfolders: tuple[str | os.PathLike, ...] = ()) -> Path:
    """``folder`` is (or is now created as) a folder this process can write into, and none of its
    ``subfolders`` is a file; otherwise a :class:`FileError` naming it and ``setting`` (where it was given)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nulltext-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise _write_error(f"cannot write into {folder} ({setting})", folder, error) from None
    for sub in subfolders:
        if (folder / sub).exists() and not (folder / sub).is_dir():
            raise FileError(f"cannot write into {folder} ({setting}): {folder / sub} is a file where a folder goes; move it away or write elsewhere")
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def json_checksum(data: dict) -> str:
    """sha256 of ``data`` without its :data:`CHECKSUM` key, in a canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(_canonical({k: v for k, v in data.items() if k != CHECKSUM})).hexdigest()


def atomic_write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write a JSON object atomically, with the checksum of its content under :data:`CHECKSUM`
    (computed on the content as a reader parses it back: tuples as lists, keys as strings)."""
    data = json.loads(json.dumps(data))
    data[CHECKSUM] = json_checksum(data)
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, remedy: str, old_format: Callable[[dict], bool] | None = None, **fields: tuple[type, ...]) -> dict:
    """A JSON object written by :func:`atomic_write_json`, checked, with ``fields`` as in
    :func:`check_fields`; returned without its checksum.

    A :class:`FileError` naming the file, with ``remedy`` (what to do), when it is missing,
    unreadable, not JSON, not an object, a field is missing or of another type, or its content
    does not match its checksum or has none. ``old_format`` tells the files of a format from
    before the checksums: those are read after a warning line (their types are checked, their
    values cannot be).
    """
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path} not found: {remedy}" if not path.exists() else f"{path} is not a file: {remedy}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise FileError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:  # not UTF-8, or not JSON
        reason = f"{error.msg} at line {error.lineno} column {error.colno}" if isinstance(error, json.JSONDecodeError) else "not UTF-8 text"
        raise FileError(f"{path} is damaged (not JSON: {reason}): {remedy}") from None
    except RecursionError:
        raise FileError(f"{path} is damaged (not JSON: nested too deeply): {remedy}") from None
    if not isinstance(data, dict):
        raise FileError(f"{path} is damaged (a JSON {type(data).__name__} where an object is expected): {remedy}")
    if CHECKSUM in data and data[CHECKSUM] != json_checksum(data):
        raise FileError(f"{path} is damaged (its content does not match the checksum it records): {remedy}")
    check_fields(data, path, remedy, **fields)
    if CHECKSUM not in data:
        if old_format is None or not old_format(data):
            raise FileError(f"{path} records no checksum (damaged, or written by a nulltext from before the checksums): {remedy}")
        log.warning("%s records no checksum (written by a nulltext from before the checksums): its content cannot be verified", path)
    return {k: v for k, v in data.items() if k != CHECKSUM}


def _kind(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a text", dict: "an object", list: "a list", bool: "true or false", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def check_fields(data: dict, path: str | os.PathLike, remedy: str, **fields: tuple[type, ...]) -> dict:
    """Each named field of ``data`` (a file's content) is of one of its types; ``type(None)`` among
    them makes it optional. Returns ``data``; a :class:`FileError` naming the file and field otherwise."""
    for key, kinds in fields.items():
        value = data.get(key)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            found = "missing" if key not in data else f"{json.dumps(value)[:40]}"
            raise FileError(f"{path} is damaged ('{key}' is {found}, not {_kind(kinds)}): {remedy}")
    return data
