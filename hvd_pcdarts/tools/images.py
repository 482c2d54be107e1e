"""The files of an ImageFolder tree: listing them, one line naming a file that cannot be read, and a scan of the
whole tree split over the ranks (`bin/doctor.py --scan-data`)."""

from __future__ import annotations

import os

from ..errors import UsageError


class UnreadableImageError(UsageError):
    """An image file that cannot be decoded. A DataLoader worker's exception comes back to the main process with
    the worker's traceback as its message; only the original line is kept."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def _open_rgb(path: str):
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")  # convert() decodes the whole file


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class ImageReader:
    """ImageFolder's loader: the RGB image at `path`; UnreadableImageError naming the file (relative to `root`,
    the --data-dir) when it cannot be read. Picklable, for the loader's worker processes."""

    def __init__(self, root: str):
        self.root = root

    def __call__(self, path: str):
        try:
            return _open_rgb(path)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise UnreadableImageError(f"unreadable image {os.path.relpath(path, self.root)} in --data-dir "
                                       f"{self.root}: {_reason(e)}") from None


def walk_files(root: str, top: str) -> list[str]:
    """The files under root/top (links followed, as ImageFolder does; hidden files left out), relative to root."""
    out = []
    for d, dirs, files in os.walk(os.path.join(root, top), followlinks=True):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if not f.startswith(".")]
    return out


def image_files(root: str) -> list[str]:
    """The image files (ImageFolder's extensions) of root/train and root/val, relative to root, sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(f for top in ("train", "val") for f in walk_files(root, top) if f.lower().endswith(IMG_EXTENSIONS))


def scan_images(root: str, rank: int, size: int) -> dict:
    """Read this rank's share (every size-th file from `rank` on) of the tree's images: {"read": n,
    "unreadable": ["<path relative to root>: <reason>", ...]}."""
    files, bad = image_files(root)[rank::size], []
    for rel in files:
        try:
            _open_rgb(os.path.join(root, rel))
        except Exception as e:
            bad.append(f"{rel}: {_reason(e)}")
    return {"read": len(files), "unreadable": bad}
