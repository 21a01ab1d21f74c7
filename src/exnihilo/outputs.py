"""One output discipline for every command: nothing a user owns is ever lost.

Every writer in exnihilo goes through these functions:

- `check_output(out, inputs)`: before any work, an output must not be one of the inputs
  (paths compared after resolving symlinks), must not be a folder, and its folder must be
  creatable and writable.
- `atomic_write(out)`: whole-file outputs are written to a unique temporary file
  (`mkstemp`) in the target's folder, fsynced, given the target's mode and renamed over
  it; the temporary file is removed on every exit path (error, Ctrl-C, full disk). An
  existing output that is not a regular file (`/dev/null`, a FIFO) is written in place, never
  replaced by the rename; a symlinked output updates the file it points to.
- `OutputLock(out)`: an advisory exclusive lock (`fcntl.flock`) on a side file
  `.NAME.lock` holding the writer's PID, so a second process appending to the same output
  fails at once, naming the first.
- `side_file(out, kind)`: side files (resume state, skip logs, summaries) go to a hidden
  `.exnihilo/` folder beside the output, out of the way of data globs.
- `repair_torn_tail(path)`: a crash can leave a last line without its newline; it is cut
  only when it is not a complete JSON value (a complete one gets its newline instead).

Written here rather than taken from a library (e.g. `atomicwrites`, `filelock`) because
those replace device files, follow no "output is an input" rule, and are unmaintained or do
not report the holder's PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from exnihilo.errors import ExnihiloError

# ------------------------------------------------------------------------------ path checks


def resolved(path: str | Path) -> Path:
    """The absolute path with every symlink followed (also for a path that does not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file: equal resolved paths, or the same inode (hard
    links, bind mounts)."""
    if resolved(a) == resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_special(path: str | Path) -> bool:
    """An existing output that is not a regular file or folder (character device, FIFO,
    socket): written in place, never renamed over."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def check_output(out: str | Path, inputs: Iterable[str | Path] = (), option: str = "-o"
                 ) -> None:
    """Fail early, with one line, when `out` is an input, a folder or not writable."""
    out = Path(out)
    for inp in inputs:
        if inp is not None and Path(inp).exists() and same_file(out, inp):
            raise ExnihiloError(f"{out}: output is the input file {inp}; choose another "
                                f"{option} (nothing was changed)")
    check_writable(out)


def check_writable(path: str | Path) -> None:
    """Fail early if `path` cannot be created or written; creates missing parent folders.

    Probes the folder with a real temporary file: `os.access` says yes to root even on
    read-only or virtual filesystems.
    """
    path = Path(path)
    if is_special(path):
        if not os.access(path, os.W_OK):
            raise ExnihiloError(f"{path}: not writable")
        return
    target = resolved(path) if path.is_symlink() else path
    parent = target.parent if str(target.parent) else Path(".")
    if parent.name == SIDE_DIR and not parent.exists():
        parent = parent.parent  # the side folder is made by the first write (make_side_dir)
    if target.is_dir():
        raise ExnihiloError(f"{path}: is a directory, expected a file path")
    if parent.exists() and not parent.is_dir():
        raise ExnihiloError(f"{path}: cannot create folder {parent} (a file is in the way)")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExnihiloError(f"{path}: cannot create folder {parent} ({e.strerror})") from None
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ExnihiloError(f"{path}: not writable ({e.strerror})") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise ExnihiloError(f"{path}: not writable")


def os_error(path: str | Path, e: OSError) -> ExnihiloError:
    """An OSError while writing `path` as one user-facing line (ENOSPC, EACCES, ...)."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    return ExnihiloError(f"{path}: cannot write ({reason}); the previous file is unchanged")


# ------------------------------------------------------------------------------ atomic write

def _new_file_mode() -> int:
    """The mode `open()` would give a new file (0666 minus the umask); mkstemp uses 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Yield a file to write `path`'s new content into; it replaces `path` only when the
    block finishes without error. `mode` is "w" (text, UTF-8) or "wb".

    A non-regular existing target (/dev/null, a FIFO) is opened and written in place.
    """
    path = Path(path)
    encoding = None if "b" in mode else "utf-8"
    if is_special(path):
        try:
            with open(path, mode, encoding=encoding) as f:
                yield f
        except OSError as e:
            raise os_error(path, e) from None
        return
    target = resolved(path)  # a symlinked output updates the file it points to
    make_side_dir(target)
    keep_mode = (stat.S_IMODE(target.stat().st_mode) if target.exists()
                 else _new_file_mode())
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, keep_mode)
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def dumps(record: object) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[object]) -> int:
    """Write every row as one JSON line, atomically; returns the number of rows."""
    check_writable(path)
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(dumps(row) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------ torn tails

def repair_torn_tail(path: str | Path) -> int:
    """Make `path` end in a complete line; return the bytes removed.

    A last line without its newline is a torn write only if it does not parse as JSON: then
    it is cut (it never held a complete record). A complete JSON last line that merely lacks
    the newline (a hand-edited file) is kept and gets its newline.
    """
    path = Path(path)
    if is_special(path) or not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        cut = _last_line_start(f, size)
        f.seek(cut)
        tail = f.read()
        if _is_complete_json(tail):
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
            return 0
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        return size - cut


def _last_line_start(f: IO[bytes], size: int) -> int:
    """Offset just after the last newline before the end (0 when there is none)."""
    pos = size - 1
    while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        idx = f.read(pos - start).rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


def _is_complete_json(data: bytes) -> bool:
    if not data.strip():
        return False
    try:
        json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


# ------------------------------------------------------------------------------ side files

# Side files (resume state, skip logs, summaries, results, caches) live in a hidden folder
# beside the output: `datasets.load_dataset("json", data_dir=…)` and `*.jsonl` globs then
# see only the data, since both skip hidden paths.
SIDE_DIR = ".exnihilo"


def side_path(out: str | Path, kind: str) -> Path:
    """Where the side file `kind` (e.g. "skipped.jsonl") of `out` lives:
    `<dir>/.exnihilo/<name>.<kind>`."""
    out = Path(out)
    return out.parent / SIDE_DIR / f"{out.name}.{kind}"


def legacy_side_path(out: str | Path, kind: str) -> Path:
    """Where runs made before side files had their own folder kept it: `<out>.<kind>`."""
    out = Path(out)
    return out.with_name(f"{out.name}.{kind}")


def make_side_dir(path: str | Path) -> None:
    """Create the side-file folder `path` is in, if it is one (just before its first
    write, so a run refused during validation leaves no empty folder behind)."""
    parent = Path(path).parent
    if parent.name == SIDE_DIR:
        parent.mkdir(parents=True, exist_ok=True)


def side_file(out: str | Path, kind: str) -> Path:
    """`side_path(out, kind)`; a side file of an older run (beside the output) is moved
    there first, so resuming that run finds its state. The folder itself is made by the
    first write (`atomic_write`, `check_writable`), so a run refused early leaves none."""
    new, old = side_path(out, kind), legacy_side_path(out, kind)
    if old.is_file() and not os.path.lexists(new):
        with contextlib.suppress(OSError):  # an unwritable folder fails later, naming it
            new.parent.mkdir(exist_ok=True)
            os.replace(old, new)
    return new


# ------------------------------------------------------------------------------ the lock

def lock_path(out: str | Path) -> Path:
    target = resolved(out)
    return target.with_name(f".{target.name}.lock")


# Locks this process holds, by lock file: (fd, depth). Re-entrant so a library function
# can lock an output its caller (the CLI, before loading a model) already locked.
_held: dict[Path, list[int]] = {}
_held_guard = threading.Lock()


class OutputLock:
    """Exclusive advisory lock on an output, held by one process at a time.

    `fcntl.flock` on the side file `.NAME.lock` (never the output itself, which is
    renamed over by atomic rewrites). The holder's PID is written into it so a second
    writer can name it. The side file is removed on release; an acquirer re-checks that
    the file it locked is still the one on disk, so removal cannot let two holders in.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = lock_path(out)
        self._acquired = False

    def acquire(self) -> OutputLock:
        if is_special(self.out):
            return self  # /dev/null and FIFOs: nothing to protect, nowhere to put a lock
        with _held_guard:
            held = _held.get(self.path)
            if held is not None:
                held[1] += 1
                self._acquired = True
                return self
            fd = self._lock_file()
            _held[self.path] = [fd, 1]
        self._acquired = True
        return self

    def _lock_file(self) -> int:
        make_side_dir(self.path)  # a side file's lock sits in the side folder
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_pid(fd)
                os.close(fd)
                who = f"process {other}" if other else "another process"
                raise ExnihiloError(f"{self.out}: {who} is writing it (lock {self.path}); "
                                    f"wait for it to finish or choose another -o") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it between our open and lock: try again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        with _held_guard:
            held = _held.get(self.path)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _held[self.path]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(held[0])  # closing releases the flock

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
