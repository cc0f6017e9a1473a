"""A run's output folder belongs to that run: the lock it holds there, and the line that resumes it.

Every app holds ``<folder>/.nulltext.lock`` (:class:`FolderLock`) while it writes into its folder,
and a multirun also holds its sweep folder's. The lock is the system's (``flock``), so it is
released when the process ends however it ends, SIGKILL included: a lock left by a killed run is
free, and the next run takes it over (and says so). The file holds the holder's pid, host, start
time and command, for the one line of a run that finds the folder busy; a holder that ends normally
empties it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from nulltext.errors import NulltextError

log = logging.getLogger(__name__)

LOCK_FILE = ".nulltext.lock"


class FolderInUseError(NulltextError):
    """Another process holds the lock of the folder a run would write into."""


def _describe(holder: str) -> str:
    """The lock file's content as words: 'pid 12 on host h, started 2026-01-01 10:00:00: nulltext ...'."""
    try:
        h = json.loads(holder)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, TypeError, KeyError):
        return "its holder has not written its name yet"


class FolderLock:
    """The lock of ``folder`` (created if missing); ``override`` is the setting that picks another
    folder, named in the message when it is busy; ``app`` the holder's app (its config name), for its
    command line. Use as a context manager."""

    def __init__(self, folder: str | os.PathLike, override: str, app: str = "config") -> None:
        self.folder = Path(folder)
        self.override = override
        self.app = app
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.folder / LOCK_FILE
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:  # read-only, or a file where the folder goes
            raise NulltextError(
                f"cannot write into folder {self.folder} ({type(error).__name__}: {error.strerror}): give another {self.override}=<folder>"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUseError(
                f"folder {self.folder} is in use by another run ({_describe(path.read_text(errors='replace'))}): "
                f"wait for it to end, or give another {self.override}=<folder>"
            ) from None
        except OSError as error:  # a file system without locks (ENOLCK, EOPNOTSUPP)
            os.close(fd)
            log.warning("cannot lock %s (%s): nothing keeps another run from writing into it at the same time", self.folder, error.strerror)
            return
        previous = os.read(fd, 1 << 16).decode(errors="replace")
        if previous:
            log.warning("taking over the lock of %s (%s), which ended without releasing it", self.folder, _describe(previous))
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            # The app's name is not in sys.argv any more (nulltext.cli.main takes it out for Hydra).
            "command": shlex.join(["nulltext", *([] if self.app == "config" else [self.app]), *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # empty: released by its holder, not left by a killed one
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def folder_override() -> str:
    """The setting that names a run's folder: ``hydra.sweep.dir`` in a multirun, else ``hydra.run.dir``."""
    return "hydra.sweep.dir" if in_multirun() else "hydra.run.dir"


def resume_override(output_dir: str | os.PathLike) -> str:
    """The override that makes the same command write into this run's folder again, shell-quoted.

    Needed because the default folders are named after the start time: the same command alone
    would start a new folder and recompute everything.
    """
    from hydra.core.hydra_config import HydraConfig

    folder = Path(HydraConfig.get().sweep.dir) if in_multirun() else Path(output_dir)
    return shlex.quote(f"{folder_override()}={folder.resolve()}")


def in_own_folder(task):
    """Run an app's task holding the lock of its output folder (``cfg.paths.output_dir``).

    Processes that Lightning starts for the other ranks of a multi-GPU run re-run the app into the
    same folder: only rank 0 takes the lock.
    """

    def wrapped(cfg):
        from hydra.core.hydra_config import HydraConfig
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if rank_zero_only.rank != 0:
            return task(cfg)
        with FolderLock(cfg.paths.output_dir, folder_override(), HydraConfig.get().job.config_name):
            return task(cfg)

    return wrapped


def stopped(signal_name: str, output_dir: str | os.PathLike, status: int) -> SystemExit:
    """Print the line that says how to resume an interrupted run; the exception ends the process with ``status``."""
    print(
        f"nulltext: stopped by {signal_name}; to resume, run the same command with {resume_override(output_dir)} "
        "(finished images are kept)",
        file=sys.stderr,
    )
    return SystemExit(status)


class _Terminated(BaseException):
    """SIGTERM before Lightning's handler is installed (a BaseException: nothing on the way catches it)."""


@contextmanager
def resumable(output_dir: str | os.PathLike):
    """Ctrl-C (status 130) or SIGTERM (143) inside ends the process with :func:`stopped`'s line.

    Inside ``trainer.test`` Lightning handles both: SIGTERM stops the run after the image in flight
    (the caller then checks ``trainer.received_sigterm``), and Ctrl-C becomes ``sys.exit(1)``, raised
    while handling the KeyboardInterrupt. Before it (loading the model) SIGTERM stops at once.
    """

    def on_sigterm(signum, frame):
        # Lightning's handler calls the one it found installed (this one) too: let it stop gracefully.
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            raise _Terminated

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield
    except _Terminated:
        raise stopped("SIGTERM", output_dir, 143) from None
    except (KeyboardInterrupt, SystemExit) as error:
        if isinstance(error, KeyboardInterrupt) or isinstance(error.__context__, KeyboardInterrupt):
            raise stopped("Ctrl-C", output_dir, 130) from None
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
