"""One run at a time per save directory: an advisory lock on `<save>/.run.lock`.

The lock is `flock(LOCK_EX | LOCK_NB)` on the file, held by rank 0 of the run for its whole life. The
kernel releases it when the process ends in any way (exit, exception, SIGKILL, a crashed node's NFS lease
expiring), so a lock can never outlive its run. The file holds the holder's host, pid and start time while
it is held and is emptied on a clean release; a file that still holds a holder's line but is not locked was
left by a run that died: it is taken over, with a message saying so.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from megatron.checkpointing.layout import CheckpointError

LOCK_FILE = ".run.lock"


class SaveDirBusyError(CheckpointError):
    """Another run holds the save directory."""


def lock_path(save_dir: str) -> str:
    return os.path.join(save_dir, LOCK_FILE)


def _read_holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip()


def _busy_message(save_dir: str, holder: str) -> str:
    return (f"save: {save_dir} is in use by another run ({holder or 'holder unknown'}; lock file "
            f"{lock_path(save_dir)}). Two runs saving into one directory would delete each other's "
            f"checkpoints: wait for that run to end, stop it, or set `save` to another directory.")


class SaveDirLock:
    """The lock of one save directory; `acquire()` raises SaveDirBusyError when another run holds it."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self._handle = None
        self.stale_holder: str | None = None
        """The line of a holder that died without releasing (set by `acquire`), or None."""

    def acquire(self) -> "SaveDirLock":
        os.makedirs(self.save_dir, exist_ok=True)
        handle = open(lock_path(self.save_dir), "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise SaveDirBusyError(_busy_message(self.save_dir, holder)) from None
        self.stale_holder = _read_holder(handle) or None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n")
        handle.flush()
        self._handle = handle
        return self

    def stale_message(self) -> str | None:
        if not self.stale_holder:
            return None
        return (f"save: took over the lock of {self.save_dir}, left by a run that ended without releasing it "
                f"({self.stale_holder}); its last complete checkpoint is kept.")

    def release(self) -> None:
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.flush()
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_not_busy(save_dir: str) -> None:
    """Raise SaveDirBusyError when a running process holds `save_dir`'s lock (takes and drops it at once;
    the launcher's check before any worker starts)."""
    if not os.path.isfile(lock_path(save_dir)):
        return
    with open(lock_path(save_dir), "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SaveDirBusyError(_busy_message(save_dir, _read_holder(handle))) from None
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
