"""Small shared helpers: atomic writes, hashing, logging, devices, shared-resource lookup, and
:func:`check_name` (a config string used as one folder name under ``--out``)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from synesthesia import UserError

logger = logging.getLogger("synesthesia")


MAX_NAME_BYTES = 200  # a folder name, with room for suffixes under the usual 255-byte limit


def check_name(value: str, key: str) -> str:
    """``value`` as a single folder name (a dataset, pipeline, run or set name), or a UserError.

    Such names are joined under ``--out``, so one that is empty, ``.`` or ``..``, holds a ``/``,
    ``\\``, NUL or control character, starts with ``-`` or is over 200 bytes long could write
    elsewhere (or be read as an option): it is refused, naming ``key``.
    """
    if not isinstance(value, str):
        problem = "is not a string"
    elif not value:
        problem = "is empty"
    elif value in (".", ".."):
        problem = "names the current or parent folder"
    elif "/" in value or "\\" in value:
        problem = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = "holds a control character"
    elif value.startswith("-"):
        problem = "starts with '-'"
    elif len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is over {MAX_NAME_BYTES} bytes long"
    else:
        return value
    shown = value if isinstance(value, str) else str(value)
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    raise UserError(f"{key} {shown!r} {problem}; it must be one plain folder name")


class UnsafeFile(ValueError):
    """A path that is not a regular file (``reason`` ``not_regular_file``) or is over a size
    cap (``file_too_large``): :func:`read_regular_file` refuses it before reading it."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file (symlinks resolved), else
    :class:`UnsafeFile` (``not_regular_file``): a FIFO, a device (``/dev/zero``), a socket or a
    folder is refused before anything is read. The file is opened without blocking and checked
    again on the open descriptor, so it cannot be swapped for a FIFO in between."""
    name = Path(path).name
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise UnsafeFile(f"{name}: not a regular file", "not_regular_file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    fh = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise UnsafeFile(f"{name}: not a regular file", "not_regular_file")
    return fh


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (:func:`open_regular`) of at most ``limit``
    bytes, else :class:`UnsafeFile`. OSError (missing, unreadable) is the caller's to word."""
    name = Path(path).name
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise UnsafeFile(f"{name}: {size} bytes, over the {limit}-byte cap", "file_too_large")
        return read_capped_stream(fh, size, limit, name)


def read_capped_stream(fh: BinaryIO, size: int, limit: int, name: str) -> bytes:
    """Read an open file said to hold ``size`` (≤ ``limit``) bytes; :class:`UnsafeFile` if it holds
    more than ``limit`` (it grew while being read). Reads ``size + 1`` bytes first, not ``limit``: a
    buffer of the whole cap would be allocated for every small JSON read."""
    data = fh.read(size + 1)
    if len(data) > size:
        data += fh.read(limit + 1 - len(data))
    if len(data) > limit:
        raise UnsafeFile(f"{name}: over the {limit}-byte cap", "file_too_large")
    return data


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:  # object-store clients announce every credential lookup at INFO
        for name in ("aiobotocore", "botocore", "s3fs", "fsspec"):
            logging.getLogger(name).setLevel(logging.WARNING)


def process_umask() -> int:
    """The process umask, read from ``/proc`` where it can be (``os.umask`` can only read it by
    setting it, which races with threads), else by setting and restoring it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open``/``mkdir`` would: 0o666 (files) or 0o777
    (folders) less the umask — 0644/0755 under umask 022. ``mkstemp``/``mkdtemp`` make private
    0600/0700 temporaries, which would leave published data unreadable to others on a cluster."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~process_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file under the final name: it either
    exists complete or not at all (also after SIGKILL or a full disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask_mode(tmp_path)  # published with the umask's permissions, not mkstemp's 0600
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shared_dir() -> Path | None:
    """The ``shared/`` folder beside the checkout (weights, fixtures), if there is one.

    Looked for as ``$SYNESTHESIA_SHARED``, then ``../shared`` from the working
    directory and from the package's source tree upwards.
    """
    env = os.environ.get("SYNESTHESIA_SHARED")
    if env:
        return Path(env) if Path(env).is_dir() else None
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent.parent / "shared" if parent.name else None
            if candidate is not None and (candidate / "weights").is_dir():
                return candidate
    return None


def resolve_weights(
    filename: str,
    *,
    explicit: str | Path | None = None,
    env_var: str | None = None,
    subdir: str = "",
    url: str | None = None,
) -> Path:
    """Find a weights file: explicit path, environment variable, ../shared/weights, then download.

    The download is tried only when ``url`` is given and ``HF_HUB_OFFLINE`` /
    ``SYNESTHESIA_OFFLINE`` are unset; a missing file raises one clear line.
    """
    tried = []
    if explicit:
        p = Path(explicit)
        p = p / filename if p.is_dir() else p
        if p.is_file():
            return p
        raise UserError(f"weights not found at {p} (given explicitly)")
    if env_var and os.environ.get(env_var):
        p = Path(os.environ[env_var])
        p = p / filename if p.is_dir() else p
        if p.is_file():
            return p
        tried.append(f"${env_var}={os.environ[env_var]}")
    shared = shared_dir()
    if shared is not None:
        p = shared / "weights" / subdir / filename
        if p.is_file():
            return p
        tried.append(str(p))
    offline = os.environ.get("SYNESTHESIA_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
    if url and not offline:
        cache = Path(os.environ.get("SYNESTHESIA_CACHE", Path.home() / ".cache" / "synesthesia")) / subdir
        target = cache / filename
        if target.is_file():
            return target
        try:
            import urllib.request

            logger.info("downloading %s from %s", filename, url)
            with urllib.request.urlopen(url, timeout=30) as resp:
                atomic_write_bytes(target, resp.read())
            return target
        except OSError as exc:
            tried.append(f"{url} ({exc.__class__.__name__})")
    where = f"set ${env_var} or " if env_var else ""
    raise UserError(
        f"weights file {filename} not found; {where}put it in ../shared/weights/{subdir} (tried: {', '.join(tried) or 'nothing'})"
    )


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available")
    return torch.device(name)
