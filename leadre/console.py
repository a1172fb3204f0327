"""The demo's terminal: one line per stage while everything libraries print (Python logging,
warnings, tqdm, Ray's C++ core) goes to per-stage log files."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Iterator


class Console:
    """One line per stage on the terminal. When quiet, file descriptors 1 and 2 point at the
    current stage's log file, so everything else the process prints (Python logging,
    warnings, tqdm, Ray's C++ core) lands there; this console keeps its own copy of the
    terminal."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        sys.stdout.flush()
        self.term: IO[str] = os.fdopen(os.dup(1), "w", buffering=1) if quiet else sys.stdout
        self.live = quiet and self.term.isatty()
        # Text streams writing to fds 1 and 2 themselves, standing in for a sys.stdout that is
        # not on fd 1 (pytest's, a notebook's). Never closed: a logging handler created
        # during a stage keeps the stream it found and must still work afterwards.
        self.fd_streams = (open(1, "w", buffering=1, closefd=False),
                           open(2, "w", buffering=1, closefd=False)) if quiet else ()

    def print(self, text: str = "", end: str = "\n") -> None:
        self.term.write(text + end)
        self.term.flush()

    @contextlib.contextmanager
    def output_to(self, log_file: Path) -> Iterator[None]:
        if not self.quiet:
            yield
            return
        out, err = self.fd_streams
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        saved = os.dup(1), os.dup(2)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            for stream in (sys.stdout, sys.stderr, out, err):
                stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

    @contextlib.contextmanager
    def stage_line(self, label: str) -> Iterator[Callable[[str], None]]:
        """``label`` now, then its time and a note (set through the yielded function). On a
        terminal the line counts the seconds while the stage runs."""
        note = [""]
        t0 = time.perf_counter()
        stop = threading.Event()
        if self.live:
            def tick() -> None:
                while not stop.wait(1.0):
                    self.term.write(f"\r{label} {time.perf_counter() - t0:6.0f}s")
                    self.term.flush()
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        self.print(label if self.quiet else label.rstrip(), end="" if self.quiet else "\n")
        ok = False
        try:
            yield lambda text: note.__setitem__(0, text)
            ok = True
        finally:
            stop.set()
            if self.live:
                ticker.join()
            took = f"{time.perf_counter() - t0:6.1f}s"
            status = f"{took}  {note[0]}" if ok else f"{took}  FAILED"
            prefix = "\r" + label + " " if self.live else (" " if self.quiet else label + " ")
            self.print(prefix + status.rstrip())


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def link_ray_logs(logs: Path) -> str | None:
    """``<logs>/ray`` -> the Ray session's logs (the workers' stdout/stderr are there)."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # a remote cluster or no session: nothing local to link
        return None
    target, link = Path(session) / "logs", logs / "ray"
    if not target.is_dir():
        return None
    with contextlib.suppress(OSError):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return str(link if link.is_symlink() else target)
