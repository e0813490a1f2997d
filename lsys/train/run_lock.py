"""One job per run directory, and no worker outliving its launcher.

`RunLock` takes an advisory lock (`fcntl.flock`) on `run_dir/.lock` and holds it for the run's
life; the kernel drops it when the process ends, however it ends, so a crashed job never
leaves a stale lock. The file names the holder (host, pid, start time) for the message a second
job gets. `end_with_launcher` asks Linux to stop a torchrun worker when its launcher dies
(`kill -9` of torchrun otherwise leaves the workers training, in a session of their own).
"""

import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies


class RunLockedError(RuntimeError):
    """Another job holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        """Lock the run directory (made if missing) or raise RunLockedError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = _describe(file.read())
            file.close()
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by {holder} ({self.path}); stop that job, "
                "or choose another run_name"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        file.flush()
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']} (since {since})"
    except (ValueError, KeyError, TypeError):
        return "another job"


def end_with_launcher() -> None:
    """Under torchrun on Linux: get SIGTERM when the launcher dies, and exit now if it already has."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # no prctl (a sandbox): nothing to arm
    if os.getppid() != launcher:  # it died between the two calls
        os.kill(os.getpid(), signal.SIGTERM)
