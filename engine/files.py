"""Small file primitives every layer uses: atomic writes, SHA256SUMS of shipped weights and exports, the run-dir lock.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from engine.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so a kill at any moment leaves the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


SUMS = "SHA256SUMS"


def write_sha256sums(directory: str | Path, names: list[str] | None = None) -> Path:
    """Write `SHA256SUMS` (the `sha256sum` format, so `sha256sum -c SHA256SUMS` checks it too) for `names` (default:
    every file in `directory`), so shipped weights and exported adapters can be verified when loaded."""
    directory = Path(directory)
    names = names or sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != SUMS)
    path = directory / SUMS
    write_atomic(path, "".join(f"{sha256(directory / n)}  {n}\n" for n in names))
    return path


def verify_sha256sums(directory: str | Path, only: str | None = None) -> list[str]:
    """Problems (each naming the file) with the files listed in `directory/SHA256SUMS`; [] when all match or
    there is no such file. `only` restricts the check to one listed file name."""
    directory = Path(directory)
    sums = directory / SUMS
    if not sums.is_file():
        return []
    problems = []
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        if not name or (only is not None and name != only):
            continue
        f = directory / name
        if not f.is_file():
            problems.append(f"{f} is listed in {sums} but missing")
        elif sha256(f) != digest:
            problems.append(f"{f} is corrupt: its sha256 differs from {sums}")
    return problems


class RunDirLock:
    """An exclusive lock on `<run dir>/.lock` (flock), held by rank 0 for the whole run: two processes training
    into one output dir would interleave checkpoints and metrics lines, so the second one is refused, naming the
    holder's pid. The OS drops the lock when its holder dies (SIGKILL included): a kill never leaves it stale.
    A second Trainer on the same dir inside the holding process (tests, notebooks) proceeds without it."""

    NAME = ".lock"

    def __init__(self, run_dir: Path):
        import fcntl
        import stat

        self.path = run_dir / self.NAME
        try:  # O_NOFOLLOW: a planted `.lock -> somewhere` symlink would have the pid written over its target
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            why = " (it is a symbolic link; refusing to follow it)" if self.path.is_symlink() else ""
            raise CheckpointError(f"cannot take the run-dir lock {self.path}: {exc.strerror}{why}; remove it or use "
                                  f"another --output-dir") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            self.fd = None
            raise CheckpointError(f"run-dir lock {self.path} is not a regular file; remove it or use another "
                                  f"--output-dir")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            self.fd = None
            if holder == str(os.getpid()):
                return
            raise CheckpointError(f"{run_dir} is in use by another training process (pid {holder}); wait for it to "
                                  f"finish or stop it, or use another --output-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Release the lock (closing the descriptor drops the flock)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
