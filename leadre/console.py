"""The quiet terminal of `leadre demo` (one line per stage) and of a stage run on its own (the
project's log lines), while everything libraries print (Python logging, warnings, tqdm, Ray's
C++ core) goes to per-stage log files."""

from __future__ import annotations

import contextlib
import logging
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
    terminal: the process's stdout, or its stderr with ``fd=2``."""

    def __init__(self, quiet: bool, fd: int = 1):
        self.quiet = quiet
        own = sys.stdout if fd == 1 else sys.stderr
        own.flush()
        self.term: IO[str] = os.fdopen(os.dup(fd), "w", buffering=1) if quiet else own
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


class TerminalFormatter(logging.Formatter):
    """``12:03:04 message``, and ``12:03:04 warning: message`` from WARNING up: the project's
    own lines on a quiet terminal (its log file has the full format)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{record.asctime} {level}{record.message}"


@contextlib.contextmanager
def stage_output(log_file: Path, project: str = "leadre") -> Iterator[Console]:
    """A stage run on its own, quietly: the log lines of ``project`` (and its child loggers)
    on the terminal's stderr, everything else the process prints in ``log_file``, the
    ``project`` lines too (through the root logger's handler, which writes to fd 2)."""
    console = Console(quiet=True, fd=2)
    handler = logging.StreamHandler(console.term)
    handler.setFormatter(TerminalFormatter())
    logger = logging.getLogger(project)
    logger.addHandler(handler)
    try:
        with console.output_to(log_file):
            yield console
    finally:
        logger.removeHandler(handler)
        console.term.close()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ray_session_logs() -> Path | None:
    """The log folder of this process's local Ray session (the workers' stdout/stderr are
    there); None without one."""
    if "ray" not in sys.modules:  # a stage that never used Ray: not worth importing it
        return None
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
    except Exception:  # a remote cluster or no session: nothing local
        return None
    logs = Path(session) / "logs"
    return logs if logs.is_dir() else None


def link_ray_logs(logs: Path) -> str | None:
    """``<logs>/ray`` -> the Ray session's logs (the workers' stdout/stderr are there)."""
    target, link = ray_session_logs(), logs / "ray"
    if target is None:
        return None
    with contextlib.suppress(OSError):
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return str(link if link.is_symlink() else target)
