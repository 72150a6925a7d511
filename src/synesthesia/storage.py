"""Where sets live: local folders, object stores (any fsspec URL) and, for reading, pipes.

- :func:`as_path` - a folder or file named on the command line or in a config, as a
  :class:`pathlib.Path` (a local path, ``file://…``) or a :class:`upath.UPath` (``s3://``, ``gs://``,
  ``hf://``, ``memory://`` … - pathlib's API over fsspec, so the same ``/``, ``exists()``, ``glob()``,
  ``open()`` serve both); ``pipe:`` and ``http(s)://``, which cannot hold a set, and ``s3:/x`` (a URL
  that lost a slash, as ``Path("s3://x")`` makes it) are refused in one line; :func:`is_remote`;
- :func:`open_input` - one input file opened for binary reading: a local regular file
  (:func:`synesthesia.utils.open_regular`), an fsspec URL, or ``pipe:COMMAND`` (the command's standard
  output; a non-zero exit is an ``OSError`` at the end of the stream); :func:`input_size`;
- :func:`expand_inputs` - a brace pattern, glob or folder of input tars, local or remote, as a sorted
  list of URLs (webdataset's ``braceexpand``; a named file that is missing is a UserError);
- :func:`input_stamp` - size and version of one input (a changed input changes it);
- :func:`read_capped` - a whole small file (JSON, a card) under a byte cap, as
  :func:`synesthesia.utils.read_regular_file` does for local files;
- :func:`atomic_path`, :func:`atomic_write_bytes`, :func:`atomic_write_text` - publish a file whole or
  not at all: locally :func:`synesthesia.utils.atomic_path` (``mkstemp``, fsync, ``os.replace``); on an
  object store a hidden temporary key ``.<name>.<token>.tmp`` beside the target, moved onto it only
  when complete, and deleted on failure;
- :func:`remove_stale_temps` - the temporaries a killed writer left (locally
  :func:`synesthesia.processes.remove_stale_temps`; in a bucket by the key's modification time);
  :func:`refresh` - forget fsspec's cached listing of a remote folder (other processes wrote to it).

Credentials and endpoints come from the store's usual configuration (``AWS_*`` variables, ``~/.aws``,
``GOOGLE_APPLICATION_CREDENTIALS``, ``HF_TOKEN``, fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables
or config file), never from the URL, so a path passed between processes as a string loses nothing.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from upath import UPath

from synesthesia import UserError, utils
from synesthesia.processes import LEASE_S, is_temp_name
from synesthesia.processes import remove_stale_temps as remove_local_stale_temps

AnyPath = Path | UPath

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_COLLAPSED = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):/([^/].*)?$", re.DOTALL)
READ_ONLY_SCHEMES = ("http", "https")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_GLOB_CHARS = re.compile(r"[*?\[]")


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def _known_schemes() -> set[str]:
    from fsspec.registry import known_implementations

    return set(known_implementations)


def as_path(value: str | os.PathLike, what: str = "path") -> AnyPath:
    """``value`` as a local :class:`~pathlib.Path` or a remote :class:`~upath.UPath`.

    A URL with a scheme fsspec knows (``s3://``, ``gs://``, ``hf://``, ``memory://`` …) is a UPath;
    ``file://`` is the local path it names. ``pipe:`` and ``http(s)://`` are refused (they can be
    read as one input tar, not used as a folder), as is an unknown scheme, a scheme whose package is
    not installed, and ``s3:/…`` - a URL whose ``//`` collapsed into one slash, as ``Path()`` does
    to it - which would otherwise become a local folder named ``s3:``. ``what`` names the value in
    the message (``--out``).
    """
    if isinstance(value, UPath) and not isinstance(value, Path):
        if value.protocol in ("file", "local"):
            return Path(value.path)
        return _in_this_process(value)
    if isinstance(value, Path):
        text = str(value)
    else:
        text = os.fspath(value)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
    if text.startswith("pipe:"):
        raise UserError(
            f"{what} {_shown(text)}: a pipe: command can be read as one input tar, not used as a folder"
        )
    match = _URL.match(text)
    if match is None:
        collapsed = _COLLAPSED.match(text)
        if collapsed and collapsed.group(1).lower() in _known_schemes() - {"file", "local"}:
            scheme, rest = collapsed.group(1), collapsed.group(2) or ""
            raise UserError(
                f"{what} {_shown(text)} looks like a URL that lost a slash; write {scheme}://{rest}"
                " (or give a local folder named like that as an absolute path)"
            )
        return Path(text)
    scheme = match.group(1).lower()
    if scheme in ("file", "local"):
        rest = match.group(2)
        return Path(rest[len("localhost") :] if rest.startswith("localhost/") else rest)
    if scheme in READ_ONLY_SCHEMES:
        raise UserError(f"{what} {_shown(text)}: {scheme}:// is read-only here; use it as one input tar only")
    _filesystem_class(scheme, text, what)
    return UPath(text)


def _in_this_process(path: UPath) -> UPath:
    """``path`` with a file system object of this process: a path made before a ``fork`` (a
    DataLoader worker's dataset) holds the parent's, which async stores such as s3fs refuse to use
    in the child; fsspec clears its instance cache on fork, so the same URL gives a fresh one."""
    fs = path.fs
    if getattr(fs, "_pid", None) in (None, os.getpid()):
        return path
    return UPath(str(path), **path.storage_options)


def _filesystem_class(scheme: str, text: str, what: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise UserError(
            f"{what} {_shown(text)}: unknown storage scheme {scheme}://"
            " (s3://, gs://, hf://, file:// and the other fsspec protocols are known)"
        ) from None
    except ImportError as exc:
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise UserError(
            f"{what} {_shown(text)}: {scheme}:// needs a package that is not installed ({first})"
        ) from None


def is_remote(path: object) -> bool:
    """Whether ``path`` (as :func:`as_path` returns it) lives on an fsspec store, not the local disk."""
    return isinstance(path, UPath) and not isinstance(path, Path)


def is_pipe(source: object) -> bool:
    return isinstance(source, str) and source.startswith("pipe:")


# ----------------------------------------------------------------------------- reading


class PipeReader(io.RawIOBase):
    """The standard output of ``pipe:COMMAND`` (run by the shell, as webdataset does) as a stream.

    The command's standard error goes to an unnamed temporary file; when the output ends and the
    command exited non-zero, the read raises ``OSError`` naming the command, its status and the last
    line it wrote to standard error. Closing early kills the command.
    """

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.command = url[len("pipe:") :]
        if not self.command.strip():
            raise OSError(f"{_shown(url)}: no command after pipe:")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            self.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if not n:
            status = self.proc.wait()
            if status != 0:
                raise OSError(f"{self.url[:80]}: exited with status {status}{self._last_error_line()}")
        return n

    def _last_error_line(self) -> str:
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 400))
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return f" ({lines[-1][:160]})" if lines else ""

    def close(self) -> None:
        if not self.closed:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.wait()
            self._stderr.close()
        super().close()


def open_input(source: str | os.PathLike) -> BinaryIO:
    """One input file opened for binary reading: ``pipe:COMMAND``, an fsspec URL, or a local path.

    A local path must be a regular file (:func:`synesthesia.utils.open_regular`: a FIFO or a device
    is :class:`~synesthesia.utils.UnsafeFile`); so must a remote one (a folder is refused). A missing
    file is ``FileNotFoundError``; other failures are ``OSError``.
    """
    if is_pipe(source):
        return io.BufferedReader(PipeReader(source))
    text = source if isinstance(source, str) else None
    if text is not None and _URL.match(text) and _URL.match(text).group(1).lower() in READ_ONLY_SCHEMES:
        import fsspec

        return fsspec.open(text, "rb").open()
    path = as_path(source, "input")
    if not is_remote(path):
        return utils.open_regular(path)
    if not path.is_file():
        if path.exists():
            raise utils.UnsafeFile(f"{path}: not a regular file", "not_regular_file")
        raise FileNotFoundError(f"{path}: no such file")
    return path.open("rb")


class ForwardReader(io.RawIOBase):
    """A forward-only stream (a pipe) made seekable enough for :mod:`tarfile`'s checked reader:
    ``tell()``, seeking forward (reading and dropping) and seeking back within the last ``window``
    bytes passed on; seeking back further is ``OSError``."""

    def __init__(self, raw: BinaryIO, window: int = 1 << 16):
        super().__init__()
        self.raw = raw
        self.window = window
        self.history = bytearray()  # the last bytes read from ``raw``, ending at ``end``
        self.end = 0  # bytes read from ``raw`` so far
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        if self.pos < self.end:
            start = len(self.history) - (self.end - self.pos)
            chunk = self.history[start : start + len(buffer)]
            buffer[: len(chunk)] = chunk
            self.pos += len(chunk)
            return len(chunk)
        n = self.raw.readinto(buffer)
        if n:
            self.history += memoryview(buffer)[:n]
            del self.history[: max(0, len(self.history) - self.window)]
            self.end += n
            self.pos += n
        return n or 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset + (self.pos if whence == os.SEEK_CUR else 0)
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self.end - len(self.history):
            raise OSError("cannot seek back this far in a pipe")
        while self.end < target:
            self.pos = self.end
            if not self.read(min(1 << 20, target - self.end)):
                break
        self.pos = min(target, self.end)
        return self.pos

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


def forward_seekable(fh: BinaryIO) -> BinaryIO:
    """A forward-only stream (``input_size`` None) as a buffered :class:`ForwardReader`; a gzip
    stream (``.tar.gz`` through a pipe) is decompressed on the way, so a tar reader sees plain tar."""
    import gzip

    head = ForwardReader(fh)
    magic = b""
    while len(magic) < 2 and (more := head.read(2 - len(magic))):
        magic += more
    gzipped = magic == b"\x1f\x8b"
    head.seek(0)
    if gzipped:
        head = ForwardReader(gzip.GzipFile(fileobj=io.BufferedReader(head), mode="rb"))
    return io.BufferedReader(head)


def input_stamp(url: str) -> str:
    """What changes when an input file changes: size and modification time (a local file), size
    and ETag or modification time (an object), ``-`` for what cannot be looked at (``pipe:``,
    ``http(s)://``, a vanished file)."""
    if is_pipe(url) or (_URL.match(url) and _URL.match(url).group(1).lower() in READ_ONLY_SCHEMES):
        return "-"
    path = as_path(url, "input")
    try:
        if not is_remote(path):
            st = os.stat(path)
            return f"{st.st_size} {st.st_mtime_ns}"
        info = path.fs.info(path.path)
    except (OSError, ValueError):
        return "-"
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size', '-')} {version}"


def input_size(fh: BinaryIO) -> int | None:
    """The byte size of a stream from :func:`open_input`, or None when it is not known (a pipe)."""
    size = getattr(fh, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(fh.fileno()).st_size
    except (OSError, AttributeError, io.UnsupportedOperation):
        return None


def read_capped(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, local or remote, else
    :class:`~synesthesia.utils.UnsafeFile` (``not_regular_file``, ``file_too_large``); a missing or
    unreadable file is ``OSError``. The size is checked before reading and again while reading."""
    path = as_path(path)
    if not is_remote(path):
        return utils.read_regular_file(path, limit)
    try:
        info = path.fs.info(path.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if info.get("type") != "file":
        raise utils.UnsafeFile(f"{path.name}: not a regular file", "not_regular_file")
    size = info.get("size")
    if not isinstance(size, int) or size > limit:
        raise utils.UnsafeFile(f"{path.name}: {size} bytes, over the {limit}-byte cap", "file_too_large")
    with path.open("rb") as fh:
        return utils.read_capped_stream(fh, size, limit, path.name)


def expand_inputs(spec: str) -> list[str]:
    """The input tars ``spec`` names, in order: each brace alternative (``shard-{000..009}.tar``) is a
    file, a glob (``*.tar``) or a folder (its ``.tar``/``.tar.gz``/``.tgz`` files, sorted), local or
    on any fsspec store; ``pipe:`` commands and ``http(s)://`` URLs are passed through (they cannot
    be listed). A named file that does not exist, or a pattern or folder with no tar, is a UserError."""
    from braceexpand import braceexpand

    urls: list[str] = []
    listings: dict[str, set[str]] = {}
    for item in braceexpand(spec):
        if is_pipe(item) or (_URL.match(item) and _URL.match(item).group(1).lower() in READ_ONLY_SCHEMES):
            urls.append(item)
            continue
        path = as_path(item, "input")
        if _GLOB_CHARS.search(str(path) if not is_remote(path) else path.path):
            found = _glob(path)
            if not found:
                raise UserError(f"no input tar matches {_shown(item)}")
            urls.extend(found)
        elif path.is_dir():
            # every tar-named entry but a folder: a FIFO or device named .tar is refused (and counted)
            # when it is opened, rather than silently left out here
            found = sorted(str(p) for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and not p.is_dir())
            if not found:
                raise UserError(f"no .tar files in {_shown(item)}")
            urls.extend(found)
        elif _exists(path, listings):
            urls.append(str(path))
        else:
            raise UserError(f"webdataset shard not found: {item}")
    return urls


def _glob(path: AnyPath) -> list[str]:
    if not is_remote(path):
        return sorted(p for p in glob.glob(str(path)) if os.path.isfile(p))
    fs = path.fs
    found = sorted(p for p, info in fs.glob(path.path, detail=True).items() if info.get("type") == "file")
    return [str(UPath(fs.unstrip_protocol(p), **path.storage_options)) for p in found]


def _exists(path: AnyPath, listings: dict[str, set[str]]) -> bool:
    """Whether ``path`` is a file; remote files are looked up in one listing of each folder."""
    if not is_remote(path):
        return path.is_file()
    parent = str(path.parent)
    if parent not in listings:
        try:
            entries = path.fs.ls(path.parent.path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        listings[parent] = {
            e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"
        }
    return path.name in listings[parent]


# ----------------------------------------------------------------------------- writing


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[AnyPath]:
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds.

    Local: :func:`synesthesia.utils.atomic_path`. Remote: the block writes the hidden key
    ``.<name>.<token>.tmp``, which is then moved onto ``path`` (a server-side copy and delete on S3)
    and is deleted if the block or the move fails, so ``path`` never exists half-written. A
    temporary left by a killed process is removed by :func:`remove_stale_temps`.
    """
    path = as_path(path)
    if not is_remote(path):
        with utils.atomic_path(path) as tmp:
            yield tmp
        return
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fs = path.fs
    try:
        yield tmp
        fs.mv(tmp.path, path.path)
    finally:
        with suppress(OSError):  # a failed clean-up must not hide the block's own error
            if fs.exists(tmp.path):
                fs.rm(tmp.path)
        fs.invalidate_cache(path.parent.path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def refresh(path: AnyPath) -> None:
    """Forget fsspec's cached listing of a remote folder, so files other processes wrote are seen."""
    if is_remote(path):
        path.fs.invalidate_cache(path.path)


def remove_stale_temps(directory: AnyPath, own: Sequence[str] = (), lease_s: float = LEASE_S) -> list[str]:
    """Remove the temporaries dead writers left in ``directory``; the names removed.

    Local: :func:`synesthesia.processes.remove_stale_temps`. Remote: a hidden ``.….tmp`` key that
    matches one of ``own`` goes at once, any other once it is older than ``lease_s`` seconds (an
    object store has no open-file table to ask, so the lease is all there is).
    """
    directory = as_path(directory)
    if not is_remote(directory):
        return [p.name for p in remove_local_stale_temps(directory, own, lease_s)]
    fs = directory.fs
    refresh(directory)
    try:
        entries = fs.ls(directory.path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    now = time.time()
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not is_temp_name(name):
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in own):
            try:
                age = now - fs.modified(entry["name"]).timestamp()
            except (NotImplementedError, OSError, AttributeError):
                continue
            if age < lease_s:
                continue
        with suppress(FileNotFoundError):
            fs.rm(entry["name"])
        removed.append(name)
    refresh(directory)
    return removed
