"""A run's output folder that knows its state: locked while a run is live, never overwritten by accident.

``automtl convert`` and ``automtl search`` write checkpoints, a log and results into ``--out``.
Starting a second run there would silently replace the first one's checkpoint and truncate its
log, and two live runs would overwrite each other's results. :class:`RunDirectory` prevents both:
it holds an exclusive lock (``fcntl.flock`` on ``.automtl.lock``) for the life of a run, refuses
to start over an earlier run unless ``resume`` (continue it) or ``overwrite`` (replace it: the earlier run
is set aside, deleted when the new run finishes and put back if it fails) is given, and removes the
temporaries a killed run left behind.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional

from .errors import AutomtlError

LOCK_NAME = ".automtl.lock"
CHECKPOINTS = "checkpoints"
#: What a run writes; --overwrite replaces exactly these (and the checkpoints folder's own files).
RUN_FILES = ("model.automtl", "model.pt2", "policy.yaml", "sharing.svg", "report.json", "config.yaml",
             "supermodel.yaml", "supermodel.pt", "metrics.json")
CHECKPOINT_FILES = ("checkpoint.pt", "log.jsonl")
#: The same, as paths relative to the run folder: what --overwrite sets aside and puts back.
RUN_PATHS = tuple(Path(n) for n in RUN_FILES) + tuple(Path(CHECKPOINTS) / n for n in CHECKPOINT_FILES)
#: The hidden folder --overwrite moves an earlier run into until the new run has finished.
REPLACED_PREFIX = ".automtl-replaced-"


def _own_folder(path: Path) -> bool:
    """A real folder (not a link) of this user's: what ``--overwrite`` sets aside is one it made."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()


def in_use(path: str | os.PathLike) -> bool:
    """Whether a live automtl run holds the lock of run folder ``path`` (tried without making a file).

    It takes a shared lock for an instant, so a run starting on the folder in that instant is told it is in use
    and may be started again; it never blocks or leaves a lock behind."""
    import fcntl

    lock_path = Path(path) / LOCK_NAME
    if lock_path.is_symlink() or not lock_path.is_file():
        return False
    try:
        fd = os.open(lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if taken


def _within(folder: Path, rel: Path) -> bool:
    """``folder / rel`` reached without following a link (a ``checkpoints`` link to another folder would move that
    folder's files)."""
    path = folder
    for part in Path(rel).parts:
        path = path / part
        try:
            if stat.S_ISLNK(path.lstat().st_mode):
                return False
        except OSError:
            return True  # absent: nothing to move
    return True


class RunDirectory:
    """Context manager over ``path`` for one run (see the module docstring).

    Raises:
        AutomtlError: another live run holds the folder; the folder holds an earlier run and
            neither ``resume`` nor ``overwrite`` was given; or the folder is not writable.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise AutomtlError("--resume continues a run and --overwrite deletes it (resume=True and overwrite=True in "
                               "Python); give one of them")
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self._replaced = None  # where --overwrite put the earlier run while the new one runs
        self._created = []  # the folders this run made, deepest first, removed again if it fails with nothing in them
        self._fresh = False
        self._lock = None

    def __enter__(self) -> "RunDirectory":
        if os.environ.get("RANK", "0") != "0":
            return self  # under torchrun, rank 0 owns the folder: it locks, checks and cleans; other ranks only read
        where = os.fspath(self.path)
        try:
            # the folders mkdir will make: those missing on the absolute path ('..' resolved) and, for a path
            # like x/.., the missing ones written before a '..' (mkdir makes x)
            where_abs = Path(os.path.abspath(self.path))
            missing = {p for p in (where_abs, *where_abs.parents) if not os.path.lexists(p)}
            missing |= {Path(os.path.abspath(p)) for p in self.path.parents if not os.path.lexists(p)}
            self._created = sorted(missing, key=lambda p: len(p.parts), reverse=True)
            if where_abs in missing:  # the run's own folder is new: so is its checkpoints folder
                self._created.insert(0, where_abs / CHECKPOINTS)
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".automtl-write-check-"):
                pass
        except OSError as exc:
            self._remove_if_empty()
            raise AutomtlError(f"output directory {where!r} is not writable ({exc.strerror}); choose another --out") from None
        self._refuse_links()
        self._acquire()
        try:
            self._settle_replaced()
            earlier = self.earlier_run()
            if earlier and not (self.resume or self.overwrite):
                raise AutomtlError(
                    f"output directory {where!r} already holds a run ({', '.join(earlier[:3])}); continue it with "
                    "--resume, start over with --overwrite (which replaces it), or choose another --out (in Python: "
                    "resume=True, overwrite=True, another out)")
            self.clean_temporaries()
            self._fresh = not earlier  # nothing of an earlier run here: what the run writes is its own
            if self.overwrite and earlier:
                self._set_aside_run()
        except BaseException:
            self._release()
            self._remove_if_empty()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if self._replaced is not None:
                self._settle(finished=exc_type is None)
        finally:
            if exc_type is not None:  # while the lock is held: a run starting now must not lose its own log
                self._remove_empty_log(interrupted=issubclass(exc_type, KeyboardInterrupt))
            self._release()
            if exc_type is not None:
                self._remove_if_empty()

    def _remove_empty_log(self, interrupted: bool = False) -> None:
        """A run that failed before its first step (a tensorboard folder it cannot write) leaves its log
        empty: that log is removed, so the corrected command is not refused as continuing a run. A log with
        records stays: it is the failed run's account; except after Ctrl-C before the first checkpoint, whose
        message says to run the command again (the log made that command refused as continuing a run)."""
        log = self.path / CHECKPOINTS / CHECKPOINT_FILES[1]
        if self._fresh and self._replaced is None and not self.checkpoint_written():
            try:
                if interrupted or log.stat().st_size == 0:
                    log.unlink()
            except OSError:
                pass

    def _remove_if_empty(self) -> None:
        """A run that failed before writing anything leaves no folder behind that it made itself: each one from
        ``path`` up is removed while it is empty (``rmdir`` refuses one that is not, so nothing anyone else
        wrote meanwhile can go)."""
        for folder in self._created:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return

    # -- state -------------------------------------------------------------------------------
    def earlier_run(self) -> list[str]:
        """What an earlier run left here (file names), empty when the folder holds none."""
        return [rel.as_posix() for rel in RUN_PATHS if (self.path / rel).exists()]

    def checkpoint_written(self) -> Optional[float]:
        """When the run's search checkpoint was last written (seconds since the epoch), None when it has none."""
        try:
            return (self.path / CHECKPOINTS / CHECKPOINT_FILES[0]).stat().st_mtime
        except OSError:
            return None

    def clean_temporaries(self) -> list[Path]:
        """Remove what a killed run left half-written: staging folders and ``.NAME.*.tmp`` files."""
        removed = []
        for folder in (self.path, self.path / CHECKPOINTS):
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                stale = (entry.name.startswith(".automtl-stage-") and entry.is_dir()) or (
                    entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file())
                if stale:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed

    def _settle(self, finished: bool) -> None:
        """The set-aside run goes when the new run ``finished`` or stopped with a checkpoint --resume continues;
        when the new run failed before its first checkpoint (bad input, a typo), it comes back."""
        if finished or self.checkpoint_written() is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
        else:
            self._restore_run()

    def _settle_replaced(self) -> None:
        """What a killed --overwrite run (SIGKILL, out of memory) left set aside, settled by :meth:`_settle`."""
        for folder in sorted(self.path.glob(REPLACED_PREFIX + "*")):
            if _own_folder(folder):  # not a link to another folder, whose files would be moved out of it
                self._replaced = folder
                self._settle(finished=False)
        self._replaced = None

    def _set_aside_run(self) -> None:
        """--overwrite: move the earlier run's files into a hidden folder, deleted once the new run finishes (or
        has a checkpoint to resume) and moved back if it fails before that, so that a typo in the new command,
        found only when the backbone or the data is built, loses nothing."""
        self._replaced = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=self.path))
        (self._replaced / CHECKPOINTS).mkdir()
        try:
            for rel in RUN_PATHS:
                if (self.path / rel).exists():
                    shutil.move(self.path / rel, self._replaced / rel)  # a copy where checkpoints/ is on another disk
        except BaseException:
            self._restore_run(drop_new=False)  # nothing half set aside
            self._replaced = None
            raise

    def _restore_run(self, drop_new: bool = True) -> None:
        """Move the set-aside run back; ``drop_new``: also delete what the new run wrote where the old one had nothing."""
        for rel in RUN_PATHS:
            if _within(self._replaced, rel) and (self._replaced / rel).exists():
                (self.path / rel).parent.mkdir(exist_ok=True)
                (self.path / rel).unlink(missing_ok=True)
                shutil.move(self._replaced / rel, self.path / rel)
            elif drop_new:
                (self.path / rel).unlink(missing_ok=True)  # what the failed run wrote where the old run had nothing
        shutil.rmtree(self._replaced, ignore_errors=True)

    def _refuse_links(self) -> None:
        """The names a run writes, reads, cleans or moves inside its folder must be its own, not links: a
        ``checkpoints`` link sent checkpoints, the log and the policy into another folder (replacing files there,
        cleaning its temporaries), a ``.automtl.lock`` link truncated the file it pointed to, a dangling
        ``checkpoints/log.jsonl`` link created its target. (The folder itself may be a link: ``--out`` is the
        user's.)"""
        for rel in (Path(LOCK_NAME), Path(CHECKPOINTS), *RUN_PATHS):
            path = self.path / rel
            if path.is_symlink():
                raise AutomtlError(
                    f"output directory {os.fspath(self.path)!r} holds {rel.as_posix()} as a link (to "
                    f"{os.readlink(path)[:200]!r}), where a run keeps its own files; remove the link or choose another --out")

    # -- lock ---------------------------------------------------------------------------------
    def _acquire(self) -> None:
        import fcntl

        lock_path = self.path / LOCK_NAME
        try:  # not through a link made after _refuse_links looked
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise AutomtlError(f"output directory {os.fspath(self.path)!r} has a lock file automtl cannot open "
                               f"({exc.strerror}); remove {LOCK_NAME} there or choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AutomtlError(
                f"output directory {os.fspath(self.path)!r} is in use by another automtl run (process {owner}); "
                "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd

    def _release(self) -> None:
        if self._lock is None:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

