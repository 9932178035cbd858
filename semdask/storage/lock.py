"""One writer per output store: an exclusive-create lock file beside the store.

``semdask segment`` holds ``<store>.semdask-lock`` (beside the store, so replacing
the store or a group never deletes it) from its first write to its last. It is
created with ``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+, Lustre,
GPFS) and names owner, host, pid, process start, boot id, start time, command,
SLURM job and a token. A second writer fails fast with
:class:`~semdask.errors.OutputLockedError` naming all of that. The lock covers the
whole store, not one label group: groups share metadata (the OME ``labels`` list,
the normalisation statistics, an ``--output`` store's image copy).

While held, a heartbeat thread touches the file every ``semdask.lock.heartbeat``
seconds (default 30). A lock is **stale** when its writer is certainly gone:

- on the same host: its pid is not running, is another process (pid reused), or
  the host rebooted since (boot id);
- an earlier run of the same SLURM job (same ``SLURM_JOB_ID``, lower
  ``SLURM_RESTART_COUNT``: a requeued job);
- on another host: no heartbeat for ``semdask.lock.stale-after`` seconds (default
  600; generous because clocks of hosts sharing a filesystem may differ).

A stale lock is never broken silently: the error names it and says to run
``semdask unlock STORE`` (:func:`break_lock`), which removes stale locks only;
``--force`` removes a lock that still looks alive and is the user's decision.

Examples
--------
>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "m.ome.zarr"
>>> with writer_lock(out, group="labels/phases") as held:
...     read_lock(out).pid == held.info.pid, stale_reason(read_lock(out)) is None
(True, True)
>>> read_lock(out) is None
True
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from semdask import __version__, config
from semdask.errors import OutputLockedError, UnsafePathError

__all__ = ["SUFFIX", "LockInfo", "WriterLock", "break_lock", "lock_path", "read_lock",
           "stale_reason", "writer_lock"]

log = logging.getLogger(__name__)
SUFFIX = ".semdask-lock"
_UNREADABLE_GRACE_S = 10.0  # a lock file still being written by its creator


@dataclass(frozen=True)
class LockInfo:
    """The contents of a lock file (who writes the store) and its last heartbeat."""

    path: str
    output: str
    group: str
    owner: str
    host: str
    pid: int
    started: float  #: Unix time the lock was taken
    process_start: float | None  #: the pid's start time (detects a reused pid)
    boot_id: str | None
    command: str
    token: str
    slurm_job: str | None = None
    slurm_restart: int | None = None
    version: str = ""
    pid_ns: int | None = None
    heartbeat: float = 0.0  #: Unix time of the last heartbeat (the file's mtime)

    def describe(self) -> str:
        """``user alice, host n01, pid 4242, started 2026-12-07 14:01:02 (12 min ago)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return (f"user {self.owner}, host {self.host}, pid {self.pid}{job}, started {when} "
                f"({_ago(time.time() - self.started)}), command: {self.command}")


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s ago"
    return f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of an output store: ``<resolved store>.semdask-lock`` beside it.

    The store path is resolved (symlinks, ``..``, the working directory), so every
    spelling of one store names the same lock.
    """
    p = Path(output).expanduser().resolve()
    return p.with_name(p.name + SUFFIX)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_ns() -> int | None:
    """The PID namespace (containers on one host may share its hostname, not its pids)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _slurm() -> tuple[str | None, int | None]:
    job = os.environ.get("SLURM_JOB_ID") or None
    restart = os.environ.get("SLURM_RESTART_COUNT")
    return job, (int(restart) if restart and restart.isdigit() else (0 if job else None))


def _new_info(path: Path, output: Path, group: str) -> LockInfo:
    job, restart = _slurm()
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    pid = os.getpid()
    return LockInfo(path=str(path), output=str(output), group=group, owner=user,
                    host=socket.gethostname(), pid=pid, started=time.time(),
                    process_start=_process_start(pid), boot_id=_boot_id(),
                    command=" ".join(sys.argv)[:500], token=uuid.uuid4().hex,
                    slurm_job=job, slurm_restart=restart, version=__version__,
                    pid_ns=_pid_ns())


def _read(path: Path, retries: int = 5) -> LockInfo | str | None:
    """The lock at ``path``: None when absent, a string when unreadable (why)."""
    why = ""
    for i in range(retries):
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:
            return f"unreadable ({e.strerror})"
        try:
            data = json.loads(text)
            fields = {k: data[k] for k in LockInfo.__dataclass_fields__ if k in data}
            return LockInfo(**{**fields, "path": str(path), "heartbeat": mtime})
        except (ValueError, TypeError) as e:  # being written by its creator, or damaged
            why = f"unreadable ({type(e).__name__})"
        if i + 1 < retries:
            time.sleep(0.05 * (i + 1))
    return why


def read_lock(output: str | os.PathLike[str]) -> LockInfo | None:
    """The lock of ``output`` (None when no writer holds it).

    Raises
    ------
    OutputLockedError
        When a lock file exists but cannot be read (its creator is still writing it,
        or it is damaged).
    """
    path = lock_path(output)
    got = _read(path)
    if isinstance(got, str):
        raise _unreadable(Path(output), path, got)
    return got


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _unreadable(out: Path, path: Path, got: str) -> OutputLockedError:
    age = _age(path)
    fresh = age <= _UNREADABLE_GRACE_S  # its creator may still be writing it
    return OutputLockedError(
        f"writer lock {path}", expected="a readable lock file",
        got=f"a lock file that is {got}, last modified {_ago(age)}",
        fix=("retry in a few seconds, or " if fresh else "") + f"semdask unlock {out}"
        + (" --force" if fresh else "") + ", if no semdask segment run writes this output")


def stale_reason(info: LockInfo) -> str | None:
    """Why the writer of ``info`` is certainly gone, or None when it may still run."""
    now, limit = time.time(), float(config.get("lock.stale-after", 600))
    job, restart = _slurm()
    if (job and info.slurm_job == job and info.slurm_restart is not None
            and restart is not None and info.slurm_restart < restart):
        return (f"it was left by an earlier run (restart {info.slurm_restart}) of this SLURM "
                f"job {job}, which has ended")
    ns = _pid_ns()
    if info.host == socket.gethostname() and (None in (ns, info.pid_ns) or ns == info.pid_ns):
        boot = _boot_id()
        if boot and info.boot_id and boot != info.boot_id:
            return f"host {info.host} has rebooted since"
        if not _alive(info.pid):
            return f"process {info.pid} is no longer running on {info.host}"
        start = _process_start(info.pid)
        if start is not None and info.process_start is not None \
                and abs(start - info.process_start) > 1.0:
            return f"pid {info.pid} on {info.host} is now another process (the pid was reused)"
        return None
    if now - info.heartbeat > limit:
        return (f"no heartbeat from host {info.host} for {now - info.heartbeat:.0f} s "
                f"(> semdask.lock.stale-after = {limit:.0f} s)")
    return None


def _locked_error(output: Path, info: LockInfo, reason: str | None) -> OutputLockedError:
    if reason is None:
        return OutputLockedError(
            f"output {output}", expected="no other writer",
            got=f"a running semdask segment holds {info.path} ({info.describe()})",
            fix=f"wait for it to finish, or stop it (pid {info.pid} on {info.host}); only if "
            f"you are sure that no run writes it: semdask unlock {output} --force")
    return OutputLockedError(
        f"output {output}", expected="no other writer",
        got=f"a stale writer lock {info.path} ({info.describe()}); stale because {reason}",
        fix=f"check the output, then remove the lock: semdask unlock {output} "
        "(then rerun with --resume to finish that run's output)")


class WriterLock:
    """A held writer lock: a context manager with a heartbeat thread.

    Use :func:`writer_lock` to take one.
    """

    def __init__(self, output: Path, info: LockInfo, heartbeat: float) -> None:
        self.output = output
        self.info = info
        self.path = Path(info.path)
        self._stop = threading.Event()
        self._lost = ""
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                        name=f"semdask-lock-heartbeat-{output.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            got = _read(self.path)
            if not isinstance(got, LockInfo) or got.token != self.info.token:
                self._lost = "removed" if got is None else "taken over by another writer"
                log.error("the writer lock %s was %s while this run was writing %s; this run "
                          "will not mark its output complete", self.path, self._lost,
                          self.output)
                return
            try:
                os.utime(self.path)
            except OSError as e:  # a transient NFS error: the next beat tries again
                log.warning("heartbeat of %s failed: %s", self.path, e)

    def check(self) -> None:
        """Raise :class:`OutputLockedError` unless this run still holds the lock.

        Called before an output is marked complete: a run whose lock was broken
        (``semdask unlock --force``) never marks its output complete.
        """
        got = _read(self.path)
        if not self._lost and isinstance(got, LockInfo) and got.token == self.info.token:
            return
        lost = self._lost or ("removed" if got is None else "taken over by another writer")
        raise OutputLockedError(
            f"output {self.output}", expected="the writer lock held by this run until the end",
            got=f"the lock {self.path} was {lost} while this run was writing",
            fix=f"make sure no other run writes it, then: semdask segment ... --resume "
            f"(see semdask verify {self.output})")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still this run's."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        got = _read(self.path)
        if isinstance(got, LockInfo) and got.token == self.info.token:
            self.path.unlink(missing_ok=True)
        elif got is not None:
            log.warning("left %s alone: it is no longer this run's lock", self.path)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def writer_lock(output: str | os.PathLike[str], *, group: str = "",
                heartbeat: float | None = None) -> WriterLock:
    """Take the writer lock of an output store (fail fast when another writer has it).

    ``output`` need not exist yet (its parent directory is created); ``group`` is
    recorded for the messages; ``heartbeat`` defaults to ``semdask.lock.heartbeat``.
    Use the returned :class:`WriterLock` as a context manager: it is released on
    every exit path (return, exception, ``InterruptedRun`` after a SIGTERM drain,
    KeyboardInterrupt); a SIGKILL leaves a stale lock that the next writer names.

    Raises
    ------
    OutputLockedError
        When another writer holds the lock (live or stale: both are named).
    UnsafePathError
        When the lock file cannot be created (a read-only directory).
    """
    out = Path(output).expanduser().resolve()
    path = lock_path(out)
    every = float(heartbeat if heartbeat is not None else config.get("lock.heartbeat", 30))
    info = _new_info(path, out, group)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        got = _read(path)
        if got is None:  # released between our create and our read: one retry
            return writer_lock(output, group=group, heartbeat=heartbeat)
        if isinstance(got, str):
            raise _unreadable(out, path, got) from None
        raise _locked_error(out, got, stale_reason(got)) from None
    except OSError as e:
        raise UnsafePathError(f"writer lock {path}", expected="a file semdask can create",
                              got=f"{type(e).__name__}: {e.strerror}",
                              fix=f"make {path.parent} writable, or choose another --output"
                              ) from e
    with os.fdopen(fd, "w") as f:
        record = {k: v for k, v in asdict(info).items() if k not in ("path", "heartbeat")}
        f.write(json.dumps(record, indent=1))
        f.flush()
        os.fsync(f.fileno())
    log.debug("took the writer lock %s", path)
    return WriterLock(out, info, every)


def break_lock(output: str | os.PathLike[str], *, force: bool = False) -> str | None:
    """Remove the writer lock of ``output`` (``semdask unlock``): stale ones only, unless forced.

    Returns who held the removed lock and why it was stale (None: there was none);
    :class:`OutputLockedError` when it still looks alive and ``force`` is False. The
    lock is renamed aside first (atomic): of two concurrent unlocks only one removes
    it, and a lock a new writer took in between is put back.
    """
    out = Path(output).expanduser().resolve()
    path = lock_path(out)
    got = _read(path)
    reason: str | None
    if got is None:
        return None
    if isinstance(got, str):
        if not force and _age(path) <= _UNREADABLE_GRACE_S:  # its creator may be busy
            raise _unreadable(out, path, got)
        info, reason = None, f"the lock file was {got}"
    else:
        info = got
        reason = stale_reason(got)
        if reason is None and not force:
            err = _locked_error(out, got, None)
            raise OutputLockedError(f"writer lock {path}", expected="a stale lock",
                                    got=err.got, fix=err.fix)
    aside = path.with_name(f"{path.name}.broken-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None  # someone else removed it
    moved = _read(aside)
    if info is not None and (not isinstance(moved, LockInfo) or moved.token != info.token):
        try:  # a new writer took the lock in between: give it back (fails if taken again)
            os.link(aside, path)
        except OSError:
            log.warning("could not restore the lock %s of a new writer", path)
        aside.unlink(missing_ok=True)
        raise OutputLockedError(f"writer lock {path}", expected="the lock that was judged",
                                got="a new writer took the lock meanwhile",
                                fix=f"run semdask unlock {out} again to see who holds it")
    aside.unlink(missing_ok=True)
    what = (info.describe() if info is not None else "unreadable") + (
        f"; stale because {reason}" if reason else "; removed with force")
    log.warning("removed the writer lock %s (%s)", path, what)
    return what
