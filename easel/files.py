"""Atomic file writes: write to a temp file beside the target, then rename, so nothing is ever half-written."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing `path`; nothing half-written was left behind."""

    def __str__(self) -> str:
        return self.strerror


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with disk_full_named(path):
            yield Path(tmp)
            # mkstemp makes the file 0600 whatever the umask: give it the mode open() would have given it.
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it becomes `path` (replacing an old one only if `replace`),
    on error it is removed: a kill or a full disk never leaves half a folder under the final name."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; choose a new destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = None
    try:
        with disk_full_named(path):
            yield tmp
            _chmod_tree(tmp)
            if path.exists():  # move the old folder aside first: os.replace cannot replace a non-empty folder
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _chmod_tree(root: Path) -> None:
    """Folders 0777 and files 0666 less the umask, as mkdir and open would make them (mkdtemp makes 0700)."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(folder, f)):
                os.chmod(os.path.join(folder, f), 0o666 & ~mask)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask alone must set it to read it)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting, then restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def disk_full_named(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing `path` into a DiskFullError that names the file and the fix: ENOSPC/EDQUOT,
    and the writers' own errors on a full disk (torch.save: 'unexpected pos', safetensors: 'os error 28')."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise _disk_full(path) from None
    except Exception as e:
        said = "os error 28" in str(e) or "No space left" in str(e)  # safetensors wraps ENOSPC in its own error
        if not (said or _no_space_left(Path(path).parent)):
            raise
        raise _disk_full(path) from None


def _disk_full(path) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"no space left on the disk while writing {path}: free some space (or write "
                                      "elsewhere) and retry; nothing was left half-written")


def _no_space_left(folder: Path) -> bool:
    """Whether the folder's file system is full (under 64 KiB left to this process)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail  # root may use the reserve
    return blocks * st.f_frsize < 64 * 1024


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def next_image_number(folder: str | os.PathLike) -> int:
    """The next free A1111-style image number in a folder (files named NNNNN-...png): one more than the largest."""
    nums = [int(p.name.split("-")[0]) for p in Path(folder).glob("*.png") if p.name.split("-")[0].isdigit()]
    return max(nums, default=-1) + 1


def save_image(image, path: str | os.PathLike, **save_args) -> Path:
    """Save a PIL image atomically (format from the suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"), **save_args)
    return path


KNOWN_ERRORS = (ValueError, OSError, MemoryError, KeyError)  # what a command reports as one line, not a traceback


def error_line(e: BaseException) -> str:
    """One line that says what went wrong, for a known error (the command line prints it instead of a traceback)."""
    if isinstance(e, MemoryError):
        return ("out of memory" + (f" ({e})" if str(e) else "") + ": try a smaller size or batch, fewer steps of "
                "hires fix, or --dtype bf16")
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.strerror:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the disk{' writing ' + str(e.filename) if e.filename else ''}: free some space"
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e).strip() or type(e).__name__
