"""The run's output folder: checked writable before any work, held by one run at a time, and
storage errors reported as one line.

The lock is `output_dir/run.lock`, a JSON file with the host and pid of the run holding it,
created exclusively (O_EXCL) by rank 0 and removed when the run ends. A lock left by a run that
was killed (same host, pid no longer alive) is taken over; a lock held by a live process, or by
a process on another host (whose liveness cannot be checked from here), stops the new run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
from pathlib import Path

LOCK_FILE = "run.lock"
_PROBE = ".write_probe"

# What an OSError's errno means for the user, in their words.
_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EISDIR: "it is a folder",
            errno.EEXIST: "a file of that name is in the way of the folder",
            errno.ENOTDIR: "a file is in the way: part of the path is not a folder"}
# What to do about each, for a script's output path.
_FIXES = {errno.ENOSPC: "free disk space, or give {flag} another location",
          errno.EDQUOT: "free disk space, or give {flag} another location",
          errno.EISDIR: "give {flag} a file name, not a folder",
          errno.EEXIST: "remove that file, or give {flag} another location",
          errno.ENOTDIR: "remove that file, or give {flag} another location"}


def error_code(error: BaseException, folder: Path | None = None) -> int | None:
    """The errno of a failed write; safetensors reports OS errors as text ("os error N").
    With the `folder` written to: ENOSPC for an error that carries none when that folder's
    file system is full (torch.save's zip writer says "unexpected pos 704 vs 598")."""
    code = getattr(error, "errno", None)
    if code is None:
        match = re.search(r"os error (\d+)\)", str(error))
        code = int(match.group(1)) if match else None
    if code is None and folder is not None and disk_full(folder):
        code = errno.ENOSPC
    return code


def reason(error: BaseException, folder: Path | None = None) -> str:
    """A short reason for a failed write (of a file in `folder`, when given: see
    `error_code`): the errno's meaning when there is one, else the error's first line."""
    code = error_code(error, folder)
    if code in _REASONS:
        return _REASONS[code]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def disk_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of `folder` has less than `margin` bytes left for this process
    (root may use the blocks reserved for it): what a failed write whose error carries no errno
    most likely means (torch.save's "unexpected pos 704 vs 598" on a full disk)."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    blocks = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail
    return blocks * stat.f_frsize < margin


def write_error(path: Path, error: BaseException, advice: str) -> ValueError:
    """The one-line error for a failed write of `path`."""
    return ValueError(f"cannot write {path} ({reason(error)}). {advice}")


def output_error(flag: str, path: Path, error: BaseException) -> ValueError:
    """The one-line error for a script's output `path` (given with `flag`) that cannot be
    written: the flag, the path, why, and what to do."""
    folder = path if path.is_dir() else path.parent
    fix = _FIXES.get(error_code(error, folder), "give {flag} a writable location")
    return ValueError(f"{flag} {path}: cannot write it ({reason(error, folder)}); "
                      f"{fix.format(flag=flag)}")


def check_output_file(path: Path, flag: str) -> None:
    """Before any work: a script's output file's folder is created and a probe written there
    (then removed), and the path is not a folder; `output_error` otherwise."""
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        _probe(path.parent)
    except OSError as e:
        raise output_error(flag, path, e) from None


def check_output_folder(folder: Path, flag: str) -> None:
    """Before any work: a script's output folder is created and a probe written in it (then
    removed); `output_error` otherwise."""
    try:
        _probe(folder)
    except OSError as e:
        raise output_error(flag, folder, e) from None


def check_writable(folder: Path) -> None:
    """Create `folder` and write, then remove, a probe file in it; ValueError when either
    fails, naming the folder and what to do."""
    try:
        _probe(folder)
    except OSError as e:
        raise ValueError(f"train.output_dir {folder} is not writable ({reason(e)}); choose a "
                         "writable folder with --train.output_dir=PATH or fix its "
                         "permissions") from None


def _probe(folder: Path) -> None:
    """Create `folder` and write, then remove, a probe file in it; OSError when either fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{_PROBE}.{os.getpid()}"
    with open(probe, "w") as f:
        f.write("ok")
    probe.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """`output_dir/run.lock`, held while a run writes to the folder. `acquire` raises
    ValueError when another live run holds it; `log` receives the note about a stale lock
    taken over."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self.held = False

    def acquire(self, log=print) -> RunLock:
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:  # removed in between: try again
                    continue
                pid = holder.get("pid")
                if holder.get("host") != me["host"] or not isinstance(pid, int) or pid <= 0 \
                        or pid_alive(pid):
                    raise ValueError(
                        f"{self.path.parent} is in use by another run (pid "
                        f"{holder.get('pid')} on {holder.get('host')}, see {self.path}); "
                        "wait for it to end or choose another train.output_dir. If no run "
                        "uses it, delete the lock file") from None
                if self._holder() == holder:  # not replaced meanwhile by another new run
                    log(f"note: taking over {self.path} left by pid {pid}, which is no "
                        "longer running")
                    self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise write_error(self.path, e, "Choose a writable train.output_dir") from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
            except OSError as e:
                self.path.unlink(missing_ok=True)
                raise write_error(self.path, e, "Free disk space or choose another "
                                  "train.output_dir") from None
            self.held = True
            return self
        raise ValueError(f"could not take {self.path}: another run is starting in "
                         f"{self.path.parent}; choose another train.output_dir")

    def _holder(self) -> dict | None:
        """The lock's content (None when it is gone); an unreadable one names an unknown
        holder, which is never taken over."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        return holder if isinstance(holder, dict) else {"host": "unknown", "pid": "unknown"}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
