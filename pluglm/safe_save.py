"""Crash-safe ``save_pretrained`` / ``from_pretrained`` for PlugLM (and any Hugging Face) models.

``PreTrainedModel.save_pretrained`` writes ``config.json`` and ``model.safetensors`` in place,
and first deletes stale shard files: a process killed mid-save leaves a directory whose
weights file is truncated or missing, and the previous checkpoint is gone.
:func:`save_pretrained_atomic` runs the same ``save_pretrained`` into a temporary sibling
directory, fsyncs every file and the directory, then swaps it into place with
``pluglm._io.replace_dir`` (``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere):
a crash at any point leaves the previous or the new complete checkpoint. It also writes
``pluglm_checksums.json`` (byte size and sha256 of every file), because safetensors and
transformers do not detect a flipped bit in tensor data.
:func:`from_pretrained_safe` verifies those checksums when present, loads safetensors only
(never pickle, never remote code) and first puts back a previous version that a swap cut
short between its two renames.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from . import _io

CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "pluglm_checksums.json"
CHECKSUMS_FORMAT = "pluglm.checkpoint_checksums"
CHECKSUMS_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupted (the message names the file)."""


def _files(root: Path) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        for name in files:
            rel = (Path(d) / name).relative_to(root).as_posix()
            if rel != CHECKSUMS_FILE:
                out.append(rel)
    return sorted(out)


def write_checksums(root: str | os.PathLike) -> None:
    """Record the byte size and sha256 of every file under ``root`` in CHECKSUMS_FILE."""
    root = Path(root)
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": _io.sha256_file(root / rel)}
             for rel in _files(root)}
    doc = {"format": CHECKSUMS_FORMAT, "format_version": CHECKSUMS_VERSION, "files": files}
    _io.write_bytes(root / CHECKSUMS_FILE, json.dumps(doc, indent=1).encode("utf-8"))


def verify_checksums(root: str | os.PathLike) -> bool:
    """Check every file listed in CHECKSUMS_FILE; False when the checkpoint has none (a plain
    ``save_pretrained``). Raises CheckpointError naming the first bad file."""
    root = Path(root)
    mpath = root / CHECKSUMS_FILE
    if not mpath.is_file():
        return False
    try:
        doc = json.loads(mpath.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: not valid JSON (truncated or corrupted?): {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKSUMS_FORMAT \
            or not isinstance(doc.get("files"), dict):
        raise CheckpointError(f"{mpath}: not a {CHECKSUMS_FORMAT} file")
    fv = doc.get("format_version")
    if isinstance(fv, bool) or not isinstance(fv, int) or fv > CHECKSUMS_VERSION:
        raise CheckpointError(f"{mpath}: format version {fv!r} is not supported (this pluglm "
                              f"reads up to {CHECKSUMS_VERSION}; upgrade pluglm)")
    for rel, info in doc["files"].items():
        _io.check_listed_file(root / rel, info, mpath, CheckpointError, missing=CheckpointError)
    return True


def save_pretrained_atomic(model, save_directory: str | os.PathLike, *, tokenizer=None,
                           **kwargs) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` made atomic (module docstring).

    tokenizer: optionally saved into the same checkpoint, in the same atomic step.
    An existing ``save_directory`` is replaced only if it is a saved model (it has
    ``config.json``) or empty. Returns the absolute path of the checkpoint.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"model must have save_pretrained(directory), got {type(model).__name__}")
    if kwargs.get("safe_serialization") is False:
        raise ValueError("safe_serialization=False writes pickle files; pluglm checkpoints are "
                         "safetensors only")
    target = _io.prepare_target(save_directory, CONFIG_FILE, "model")
    tmp = _io.temp_sibling(target)
    try:
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _io.save_checkpoint("files_written")
        write_checksums(tmp)
        for root, dirs, files in os.walk(tmp):
            for name in files:
                _io.fsync_file(Path(root) / name)
            _io.fsync_dir(root)
        if not (tmp / CONFIG_FILE).is_file():
            raise RuntimeError(f"save_pretrained wrote no {CONFIG_FILE}; not swapping it in")
        _io.save_checkpoint("before_swap")
        _io.replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def recover_pretrained(path: str | os.PathLike) -> Path:
    """The directory to load for ``path``: ``path`` itself, after putting back a previous
    version that an interrupted swap left aside; or, while another process is between its
    two renames, that aside copy (with a RuntimeWarning). Raises FileNotFoundError."""
    root = Path(path).absolute()
    if root.is_dir() or _io.recover_dir(root):
        return root
    prev = _io.interrupted_versions(root)
    if not prev:
        raise FileNotFoundError(f"no saved model at {path}")
    warnings.warn(f"{path} is missing because a save was interrupted mid-swap; loading the "
                  f"previous version from {prev[0]}", RuntimeWarning, stacklevel=2)
    return prev[0]


def from_pretrained_safe(cls, path: str | os.PathLike, *, verify: bool = True, **kwargs):
    """``cls.from_pretrained(path, use_safetensors=True, **kwargs)`` after
    :func:`recover_pretrained` and (verify=True) :func:`verify_checksums`: safetensors
    weights only (a checkpoint with only pickle weights is an error, never unpickled) and
    no remote code. ``path`` must be a local directory."""
    if kwargs.get("use_safetensors") is False:
        raise ValueError("use_safetensors=False would unpickle weights; refusing")
    if kwargs.get("trust_remote_code"):
        raise ValueError("trust_remote_code=True would execute code from the checkpoint; refusing")
    kwargs["use_safetensors"] = True
    root = recover_pretrained(path)
    if verify:
        verify_checksums(root)
    return cls.from_pretrained(str(root), **kwargs)


__all__ = ["CheckpointError", "save_pretrained_atomic", "recover_pretrained",
           "from_pretrained_safe", "write_checksums", "verify_checksums"]
