"""Atomic file output and safe checkpoint loading.

Every file is written to a temporary sibling, flushed, fsynced and renamed over the target, so a crash or a
kill during a write leaves the previous version intact. Checkpoints are loaded with `weights_only=True`:
nothing in a user's file is ever executed.
"""

from __future__ import annotations

import io
import os
import tempfile

import torch

from .errors import UsageError


def temp_sibling(path: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, with the permissions an ordinary new file gets (0666
    less the umask: mkstemp's 0600 would hide every output from the other users of a shared cluster)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=d)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write_bytes(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = temp_sibling(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(obj, path: str) -> None:
    """torch.save into memory, then write atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); bad paths and corrupt files raise UsageError."""
    if os.path.isdir(path):
        raise UsageError(f"checkpoint {path}: is a directory; pass the checkpoint.pt file inside it")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, unsafe pickle content
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path}: cannot be loaded (corrupt, truncated or not a hvd-pcdarts "
                         f"checkpoint: {msg[:200]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UsageError(f"checkpoint {path}: not a hvd-pcdarts checkpoint (no 'format' key)")
    return ckpt


def check_config(ckpt_config: dict, config: dict, path: str) -> None:
    """The model-defining settings of a checkpoint must match the run's; name every mismatch."""
    diffs = [f"{k}: checkpoint {ckpt_config.get(k)!r} vs now {v!r}" for k, v in config.items()
             if k in ckpt_config and ckpt_config[k] != v]
    missing = [k for k in config if k not in ckpt_config]
    if missing:
        diffs.append(f"checkpoint lacks {', '.join(missing)}")
    if diffs:
        raise UsageError(f"checkpoint {path} is from a different configuration ({'; '.join(diffs)}): "
                         f"use a matching --output-dir/--resume, or the same settings")


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete temporary files that a killed atomic write left in `folder` (`.<name>.<random>.tmp`)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for n in names:
        if n.startswith(".") and n.endswith(".tmp") and n.count(".") >= 3:
            try:
                os.unlink(os.path.join(folder, n))
                removed.append(n)
            except OSError:
                pass
    return removed
