"""One run per output directory: the main process holds an exclusive lock on ``output_dir/.minift.lock``
from the start of a stage to its end, so a second run on the same directory is refused instead of
interleaving its metrics and checkpoints with the first. The lock is the operating system's (``flock``): a
run that dies, however it dies, releases it, and the holder's line it leaves in the file is reported as a
run that did not finish when the next run takes the directory over."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from minift.config import ConfigError

logger = logging.getLogger(__name__)
LOCK_NAME = ".minift.lock"
_HELD: dict[Path, OutputDirLock] = {}  # this process's locks, by path: a stage started again here replaces its own


class OutputDirLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir).resolve() / LOCK_NAME
        self.file, self.created = None, False

    def acquire(self) -> OutputDirLock:
        if self.path in _HELD:  # an earlier stage of this process on the same directory that ended in an error
            _HELD[self.path].release()
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "a process that has not written its pid yet"
            file.close()
            raise ConfigError(f"output_dir {self.path.parent} is in use by another run ({holder}); wait for it "
                              f"to finish, or pass another --output_dir") from None
        file.seek(0)
        left = file.read().strip()
        if left:
            logger.warning("output_dir %s: a run that did not finish (%s) left its lock; taking over",
                           self.path.parent, left)
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self.file, _HELD[self.path] = file, self
        return self

    def release(self) -> None:
        """Empty the file (an empty lock file is a run that ended cleanly) and unlock it. The file stays (deleting
        it would let a run that opened it just before lock a file no other run can see), unless this run made
        the directory and failed before writing anything else to it: then both go."""
        if self.file is None:
            return
        self.file.seek(0)
        self.file.truncate()
        if self.created and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            self.path.parent.rmdir()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None
        _HELD.pop(self.path, None)


def take_output_dir(accelerator, output_dir: str | Path) -> OutputDirLock | None:
    """Lock ``output_dir`` on the main process; every process raises the same error when it is taken."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(output_dir).acquire()
        except (ConfigError, OSError) as err:
            error = str(err) if isinstance(err, ConfigError) else f"cannot lock output_dir {output_dir}: {err}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error:
        raise ConfigError(error)
    return lock


def release_output_dirs() -> None:
    """Release every output-dir lock this process holds (the end of a recipe script, however it ended)."""
    for lock in list(_HELD.values()):
        lock.release()
