"""The launched job's processes never outlive deepy.py.

deepy.py starts DeepSpeed's runner in a new process group (session); the runner starts the per-node
launcher, which starts the workers, all in that group. Two things keep the group from being orphaned:

- `wait_until_gone(pgid)`: after the runner exits, deepy.py waits until no live process of the group is
  left (the workers may still be saving a checkpoint after a SIGTERM; the runner does not wait for them).
- the reaper (`python megatron/launcher/reaper.py <deepy pid> <pgid>`), a small process in a session of its
  own: when deepy.py dies without cleaning up (`kill -9`), it sends SIGTERM to the group (the workers save
  and stop, `training/preemption.py`) and SIGKILL to what is left after `GRACE_S` seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 60.0
POLL_S = 0.3


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` that is not a zombie exists."""
    import psutil

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return False


def wait_until_gone(pgid: int, timeout: float = GRACE_S) -> bool:
    """Wait until group `pgid` has no live process (SIGKILL to it after `timeout`); returns whether it
    ended by itself."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return False
        time.sleep(POLL_S)
    return True


def start_reaper(pgid: int) -> subprocess.Popen:
    """Start the reaper watching this process (deepy.py) and group `pgid`."""
    # run as a file, not `-m`: it needs none of the package (no torch import, starts in ~50 ms)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), str(pgid)],
                            start_new_session=True, stdin=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(watched_pid: int, pgid: int) -> None:
    """Wait while `watched_pid` lives; if it dies while group `pgid` still runs, stop the group."""
    while _alive(watched_pid) and os.getppid() == watched_pid:
        time.sleep(1.0)  # deepy.py terminates this process when its job ends
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    print(f"deepy.py ended without stopping its job: sent SIGTERM to process group {pgid}", file=sys.stderr,
          flush=True)
    wait_until_gone(pgid, GRACE_S)


if __name__ == "__main__":
    reap(int(sys.argv[1]), int(sys.argv[2]))
