"""Crash-safe folders: every save is written whole beside the previous one and published by one
atomic pointer swap; every read stays inside the folder and never follows a link.

Layout of a folder ``D``:

    D/CURRENT                 {"format": "dicekern-snapshot", "snapshot": "snapshot-<hex>",
                               "index": "<file>", "sha256": "<sha256 of that file>"}
    D/snapshot-<hex>/...      the files of one complete save (immutable once published)
    D/.lock                   serialises concurrent saves into D

A save fills ``D/.partial-<hex>`` (files created exclusively, never through a link, fsynced),
renames it to ``D/snapshot-<hex>``, fsyncs ``D``, and then replaces ``CURRENT`` atomically. A kill
at any instant leaves ``CURRENT`` naming either the previous snapshot or the new one, both whole.
Snapshots that ``CURRENT`` no longer names are removed by the save that replaced them (or by the
next one, after a kill).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

POINTER = "CURRENT"
FORMAT = "dicekern-snapshot"
_SNAPSHOT = re.compile(r"snapshot-[0-9a-f]{32}")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LEFTOVER = re.compile(r"(snapshot-|\.partial-)[0-9a-f]{32}|CURRENT\.tmp-[0-9a-f]{32}")
POINTER_MAX_BYTES = 4096


def check_plain_name(name: object, where: str) -> str:
    """A file name that stays inside its folder: no separators, no '..', not hidden, not absolute."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{where} must be a plain file name inside the folder, got {name!r}")
    return name


def parse_json_object(data: bytes, where: str) -> dict:
    """The JSON object in data, or a ValueError naming where it was read."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where} does not hold a JSON object")
    return value


def write_file(folder: Path, name: str, data: bytes) -> None:
    """Create folder/name (it must not exist, and is never reached through a link), write data, fsync."""
    fd = os.open(folder / check_plain_name(name, "a file name"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: str | os.PathLike, data: bytes) -> Path:
    """Make path hold data, atomically: a kill leaves the old file or the new one, whole. The data
    goes to a fresh file beside it (created exclusively, never through a link, fsynced) that then
    replaces it; the parent folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def make_folder(parent: Path, name: str) -> Path:
    """Create parent/name exclusively (a link or anything already there is an error)."""
    path = parent / check_plain_name(name, "a folder name")
    os.mkdir(path, 0o755)
    return path


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(root: Path, parts: tuple[str, ...], max_bytes: int) -> bytes:
    """The bytes of root/parts[0]/.../parts[-1]: each part a plain name, opened without following
    links; the last a regular file of at most max_bytes.

    Raises:
        ValueError: a part that is not a plain name, a link, not a regular file, too large, or
            unreadable; the message names the path.
    """
    path = root.joinpath(*parts)
    fds = []
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(fd)
        for i, part in enumerate(parts):
            check_plain_name(part, f"{path}: component {part!r}")
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            fd = os.open(part, flags, dir_fd=fds[-1])
            fds.append(fd)
        info = os.fstat(fds[-1])
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{path} holds {info.st_size} bytes, more than the {max_bytes} its description allows")
        chunks, left = [], info.st_size
        while left > 0:
            chunk = os.read(fds[-1], min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link: dicekern reads only files inside the folder") from None
        if error.errno == errno.ENOTDIR:
            raise ValueError(f"{path}: a component is not a folder (or is a link)") from None
        raise ValueError(f"{path} cannot be read: {error.strerror}") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)


@contextmanager
def _locked(folder: Path):
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(folder: str | os.PathLike, fill: Callable[[Path], str]) -> Path:
    """Write a new snapshot of folder with fill(partial) and publish it atomically.

    fill writes the files of the save into the fresh folder it is given (with ``write_file`` and
    ``make_folder``) and returns the name of its index file, whose checksum the pointer keeps.

    Returns:
        The published snapshot folder.
    """
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        token = uuid.uuid4().hex
        partial = folder / f".partial-{token}"
        os.mkdir(partial, 0o755)
        index = check_plain_name(fill(partial), "the index file")
        digest = hashlib.sha256(read_file(partial, (index,), 1 << 40)).hexdigest()
        fsync_folder(partial)
        snapshot = folder / f"snapshot-{token}"
        os.rename(partial, snapshot)
        fsync_folder(folder)
        pointer = {"format": FORMAT, "snapshot": snapshot.name, "index": index, "sha256": digest}
        temporary = f"{POINTER}.tmp-{token}"
        write_file(folder, temporary, json.dumps(pointer).encode())
        os.replace(folder / temporary, folder / POINTER)
        fsync_folder(folder)
        for entry in os.scandir(folder):
            if _LEFTOVER.fullmatch(entry.name) and entry.name != snapshot.name:
                _remove(Path(entry.path))
    return snapshot


def _remove(path: Path) -> None:
    """Remove one of our own leftovers, never following a link out of the folder."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def open_snapshot(folder: str | os.PathLike, *, what: str, index: str) -> tuple[Path, bytes]:
    """(the published snapshot folder, the bytes of its index file, checked against the pointer).

    Raises:
        ValueError: no snapshot published in folder (what names the expected content), a pointer
            whose index is not the expected one, or a pointer or index that is malformed or does
            not match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} holds no saved {what}: it is not a folder")
    try:
        raw = read_file(folder, (POINTER,), POINTER_MAX_BYTES)
    except ValueError as error:
        if not (folder / POINTER).exists() and not (folder / POINTER).is_symlink():
            raise ValueError(f"{folder} holds no saved {what} ({POINTER} is missing: nothing was saved, or the first save did not finish)") from None
        raise error
    pointer = parse_json_object(raw, str(folder / POINTER))
    if pointer.get("format") != FORMAT:
        raise ValueError(f"{folder / POINTER} is not a {FORMAT} pointer")
    snapshot = pointer.get("snapshot")
    if not isinstance(snapshot, str) or not _SNAPSHOT.fullmatch(snapshot):
        raise ValueError(f"{folder / POINTER}: field 'snapshot' must name a snapshot-<hex> folder, got {snapshot!r}")
    if pointer.get("index") != index:
        raise ValueError(f"{folder / POINTER}: field 'index' must be {index!r} for a saved {what}, got {pointer.get('index')!r}")
    digest = pointer.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{folder / POINTER}: field 'sha256' must be 64 hex digits, got {digest!r}")
    data = read_file(folder, (snapshot, index), 1 << 32)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{folder / snapshot / index} does not match the checksum in {folder / POINTER}: it was changed after the save")
    return folder / snapshot, data
