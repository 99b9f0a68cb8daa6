"""Small shared helpers: atomic writes, seeding, hashing, reading text and JSON(L) with clean errors."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError

from perpcs.errors import InputError, describe

# Temporary files and folders of atomic_path/atomic_dir are named `.<target>.perpcs-tmp.<8 random>[.tmp]`,
# so that leftovers of an interrupted write can be told from anything else (`remove_temp`).
_TEMP_MARK = ".perpcs-tmp."
_TEMP_NAME = re.compile(r"\..+\.perpcs-tmp\.[a-z0-9_]{8}(\.tmp)?")


@contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """Turn a failed write (a full disk, a read-only folder, safetensors' own IO error) into an InputError
    naming the file or folder written."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: could not be written: {describe(e)}") from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    So a crash or bad input never leaves a half-written file where a good one was.
    """
    path = Path(path)
    with writing_to(path), _atomic_path(path) as tmp:
        yield tmp


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TEMP_MARK}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it owner-only; the result is an ordinary shared file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds.

    Nothing deletes what it did not create: an existing `path` is refused unless it is an empty
    folder, or `replace` is set by a caller that checked it holds only what perpcs wrote there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; refusing to replace it")
    if path.exists() and not replace and any(path.iterdir()):
        raise InputError(f"{path}: folder exists and is not empty; refusing to replace it")
    with writing_to(path), _atomic_dir(path) as tmp:
        yield tmp


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the result is an ordinary shared folder
    old = None
    try:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if path.exists() and any(path.iterdir()):  # `replace`: swap, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TEMP_MARK}", dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out: str | os.PathLike, own: set[str], protected: tuple[Path, ...] = (),
                     force: bool = False) -> None:
    """The one rule of every command that writes: refuse a folder to write over where that destroys what
    perpcs did not write: a folder holding files not named in `own` (names or glob patterns; leftovers of
    perpcs's own temp files aside) unless `force`, and always the current folder, its parents, and the
    `protected` files and folders (a run, its data, a command's sources) with what they hold and what holds them."""
    where = Path(out).resolve()
    if Path.cwd().resolve().is_relative_to(where):
        raise InputError(f"{out}: is the current folder or one of its parents; refusing to write over it")
    for keep in protected:
        if where.is_relative_to(keep.resolve()) or keep.resolve().is_relative_to(where):
            raise InputError(f"{out}: is, holds or is inside {keep}; refusing to write over it")
    if where.exists() and not where.is_dir():
        raise InputError(f"{out}: exists and is not a folder; refusing to replace it")
    foreign = sorted(p.name for p in where.iterdir() if not _TEMP_NAME.fullmatch(p.name)
                     and not any(fnmatch.fnmatchcase(p.name, pattern) for pattern in own)) if where.exists() else []
    if foreign and not force:
        raise InputError(f"{out}: folder already holds files this command does not replace "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give a new or empty "
                         "folder, or --force to replace it")


def remove_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove what interrupted atomic writes left under `folder` (only names of their own pattern)."""
    removed = []
    for root, dirs, files in os.walk(folder):  # does not follow links: a derived run's links stay untouched
        for name in dirs + files:
            p = Path(root, name)
            if _TEMP_NAME.fullmatch(name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
        dirs[:] = [d for d in dirs if not _TEMP_NAME.fullmatch(d)]
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """A plain or gzip file (told apart by its magic bytes, not its name)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


@contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Turn what a broken gzip file raises deep inside a reader into an InputError naming the file."""
    try:
        yield
    except EOFError:
        raise InputError(f"{path}: truncated gzip file (it ends before its compressed data does)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"{path}: corrupt gzip file ({e})") from None


def text_lines(path: str | os.PathLike, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(line number, line) of a plain or gzip text file, a UTF-8 byte order mark dropped; bytes that
    are not `encoding` raise an InputError naming the file, the line and the column."""
    with reading(path), open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise InputError(f"{path}: line {n}: not {encoding} text (byte {raw[e.start]:#04x} at "
                                 f"column {e.start + 1})") from None
            yield n, line.removeprefix("\ufeff") if n == 1 else line


def read_text(path: str | os.PathLike) -> str:
    return "".join(line for _, line in text_lines(path))


def parse_json(text: str, where: str, lines: bool = True) -> Any:
    """json.loads whose every failure is an InputError naming `where` (and the line, if `lines`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}: " if lines else ""
        raise InputError(f"{where}: {at}invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise InputError(f"{where}: invalid JSON: {e}") from None


def read_json(path: str | os.PathLike) -> Any:
    return parse_json(read_text(path), str(path))


def write_jsonl(path: str | os.PathLike, rows: list[Any]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def deep_merge(into: dict, layer: dict) -> dict:
    """Merge `layer` into `into`: dicts key by key, anything else replaced."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that the same seed gives the same run on one machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: object) -> int:
    """A 32-bit seed from the run's seed and what it seeds (e.g. step and user): its own stream for each,
    the same one for the same parts."""
    key = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` a symbolic link to `src` (resolved), unless `dst` exists; for files a derived run reuses."""
    dst = Path(dst)
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(Path(src).resolve())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plain_json(cfg: dict, name: str = "config") -> dict:
    """A config as plain JSON (peft's LoRA to_dict holds sets), so that it compares equal to what was stored;
    `name` is the setting an error names."""
    def default(o: Any) -> Any:
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"{name}: value {o!r} of type {type(o).__name__} is not JSON-serialisable")
    return json.loads(json.dumps(cfg, sort_keys=True, default=default))
