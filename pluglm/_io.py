"""Crash-safe file helpers: checksums, fsync, and atomic replacement of a whole directory.

A save writes every file of a new version into a temporary sibling directory, fsyncs the
files and the directory, then swaps it into place:

- on Linux, with ``renameat2(RENAME_EXCHANGE)`` — one atomic step; a crash at any point leaves
  either the old or the new complete directory under the target name;
- elsewhere (or where the filesystem refuses the exchange), with two renames: target ->
  ``.NAME.old-PID-TAG``, tmp -> target. A crash between them leaves no directory under the
  target name but the complete previous version under the ``.old-`` name;
  :func:`recover_dir` (called by loaders and by the next save) puts it back.

Leftover ``.NAME.tmp-PID-TAG`` / ``.NAME.old-PID-TAG`` siblings of a process that no longer
exists are removed by the next save. Concurrent saves to the same target from several
processes are not supported (the last swap wins; neither is ever half-written).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

_CHUNK = 1 << 20

# Test hook: a stage name at which a save pauses (after printing a marker to the file named
# by _PLUGLM_SAVE_SIGNAL), so a test can SIGKILL the process mid-save. Private; no effect
# unless set.
_PAUSE_ENV = "_PLUGLM_SAVE_PAUSE_AT"
_SIGNAL_ENV = "_PLUGLM_SAVE_SIGNAL"
_NO_EXCHANGE_ENV = "_PLUGLM_SAVE_NO_EXCHANGE"


def save_checkpoint(stage: str) -> None:
    """Pause here for a long time when the test hook names ``stage`` (see module docstring)."""
    if os.environ.get(_PAUSE_ENV) != stage:
        return
    sig = os.environ.get(_SIGNAL_ENV)
    if sig:
        with open(sig, "w") as f:
            f.write(stage)
            f.flush()
            os.fsync(f.fileno())
    time.sleep(600)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    # Directory fsync makes the renames/creations inside it durable; some platforms
    # (Windows) cannot open a directory, where this is a no-op.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_sibling(target: Path) -> Path:
    """A fresh, empty directory next to ``target`` (same filesystem, so renames are atomic)."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{_tag()}"
    tmp.mkdir(parents=False)
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _siblings(target: Path, kind: str) -> list[tuple[Path, int]]:
    prefix = f".{target.name}.{kind}-"
    out = []
    if not target.parent.is_dir():
        return out
    for p in target.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            try:
                pid = int(p.name[len(prefix):].split("-", 1)[0])
            except ValueError:
                continue
            out.append((p, pid))
    return out


def interrupted_versions(target: Path) -> list[Path]:
    """Complete previous versions left under ``.NAME.old-*`` by a swap that was cut short."""
    return sorted((p for p, _ in _siblings(Path(target), "old")), key=lambda p: p.stat().st_mtime,
                  reverse=True)


def recover_dir(target: Path) -> bool:
    """If ``target`` is missing because a two-rename swap died between its renames, rename
    the previous version back. Returns True when it restored one."""
    target = Path(target)
    if target.exists():
        return False
    for old, pid in _siblings(target, "old"):
        if _pid_alive(pid) and pid != os.getpid():
            continue  # that swap is still in progress
        try:
            os.rename(old, target)
        except OSError:
            continue
        fsync_dir(target.parent)
        return True
    return False


def cleanup_leftovers(target: Path) -> None:
    """Remove temp/old siblings of ``target`` left by processes that no longer exist."""
    target = Path(target)
    for kind in ("tmp", "old"):
        for p, pid in _siblings(target, kind):
            if pid != os.getpid() and not _pid_alive(pid):
                if kind == "old" and not target.exists():
                    continue  # the only complete version: recover_dir's job
                shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). False when unsupported here."""
    if os.environ.get(_NO_EXCHANGE_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(b))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the complete, fsynced directory ``tmp`` to ``target``, replacing any existing
    ``target`` so that a crash at any point leaves one complete version (module docstring)."""
    tmp, target = Path(tmp), Path(target)
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(parent)
        save_checkpoint("after_swap")
        return
    if _exchange(tmp, target):
        fsync_dir(parent)
        save_checkpoint("after_swap")
        shutil.rmtree(tmp)  # now holds the previous version
        return
    old = parent / f".{target.name}.old-{_tag()}"
    os.rename(target, old)
    save_checkpoint("mid_swap")
    os.rename(tmp, target)
    fsync_dir(parent)
    save_checkpoint("after_swap")
    shutil.rmtree(old, ignore_errors=True)


def prepare_target(path, marker: str, what: str) -> Path:
    """Get ready to save a directory at ``path``: refuse to replace a file, or a non-empty
    directory that is not a saved ``what`` (no ``marker`` file in it); create the parent;
    finish or roll back an interrupted swap and remove dead leftovers. Returns the absolute
    target (then write into ``temp_sibling(target)`` and ``replace_dir``)."""
    target = Path(path).absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (target / marker).is_file():
            raise FileExistsError(f"{target} exists and is not a saved {what} (no {marker}); "
                                  f"refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    cleanup_leftovers(target)
    return target


def check_listed_file(path: Path, info, listed_in: Path, error: type[Exception], *,
                      verify: bool = True, missing: type[Exception] = FileNotFoundError) -> None:
    """A file that the manifest ``listed_in`` lists with ``{"bytes", "sha256"}``: present, of
    that size and (``verify``) that checksum. Raises ``error`` (``missing`` for an absent
    file) naming the file."""
    if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) \
            or not isinstance(info.get("sha256"), str):
        raise error(f"{listed_in}: no size/checksum entry for "
                    f"{Path(path).relative_to(listed_in.parent).as_posix()}")
    if not path.is_file():
        raise missing(f"{path}: missing (listed in {listed_in.name})")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise error(f"{path}: {size} bytes but {listed_in.name} says {info['bytes']} "
                    f"(truncated or modified)")
    if verify and sha256_file(path) != info["sha256"]:
        raise error(f"{path}: sha256 checksum mismatch (corrupted or modified)")

