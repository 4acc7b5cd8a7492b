"""Tie a helper server's life to the process that started it, kill -9 included.

``lm-sleep run`` starts two long-lived helpers: the Prefect server and the stage server. Each
runs in a session of its own, so that Ctrl-C in the terminal reaches the run (which then stops
them in order) and not the servers in the middle of a request. A session of its own also means
that ``kill -9`` of the run's process group leaves them running (about 257 MB each, plus the
stage server's socket directory). The tether closes that gap:

- the starter keeps the write end of a pipe and hands the read end to the tether;
- the tether leads the helper's session and runs the helper as its child;
- when the starter ends in any way (a normal stop closes the pipe; ``kill -9`` makes the kernel
  close it), the tether reads end-of-file and stops every process of the session: SIGTERM, a
  grace period, then SIGKILL; then it removes the paths it was given and exits.

    python flows/tether.py FD [--grace SECONDS] [--remove PATH]... -- CMD...

Standard library only: it runs as a plain script, so it starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

GRACE_S = 10.0


class _Stop(Exception):
    """SIGTERM or SIGINT reached the tether itself: stop the session as if the starter had gone."""


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (from /proc), zombies left out."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry))
    return out


def stop_session(child: subprocess.Popen, grace: float) -> int:
    """SIGTERM to every process of this session but the tether, SIGKILL to what is left after ``grace``;
    returns the child's exit code."""
    me, sid = os.getpid(), os.getsid(0)
    for pid in session_members(sid):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p != me for p in session_members(sid)):
        child.poll()  # reap the child as soon as it exits
        time.sleep(0.05)
    for pid in session_members(sid):
        if pid != me:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return child.wait()


def watch(fd: int, cmd: Sequence[str], remove: Sequence[str], grace: float) -> int:
    """Run ``cmd``; when ``fd`` reads end-of-file (the starter is gone) or a signal asks, stop the session.
    The exit code is the child's."""

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child = subprocess.Popen(list(cmd))  # same session and process group as the tether
    exited = os.pidfd_open(child.pid)
    try:
        while True:
            ready, _, _ = select.select([fd, exited], [], [])
            if exited in ready:  # the helper ended on its own: nothing else to stop
                code = child.wait()
                break
            if not os.read(fd, 4096):  # the starter's end closed
                raise _Stop
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = stop_session(child, grace)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)
    return code if code >= 0 else 128 - code


@contextlib.contextmanager
def tethered(cmd: Sequence[str], *, remove: Sequence[str | Path] = (), grace: float = GRACE_S,
             **popen: object) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` under a tether, in a session of its own; yield the tether's Popen (its exit code is
    ``cmd``'s). Leaving the block stops the session gracefully; the starter dying stops it too.
    ``remove``: paths (directories) deleted once the session is stopped."""
    read_end, write_end = os.pipe()  # both close-on-exec: no other child of the starter holds the write end
    try:
        argv = [sys.executable, str(Path(__file__).resolve()), str(read_end), "--grace", str(grace)]
        for path in remove:
            argv += ["--remove", str(path)]
        proc = subprocess.Popen([*argv, "--", *cmd], pass_fds=(read_end,), start_new_session=True,
                                **popen)  # type: ignore[arg-type]
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    try:
        yield proc
    finally:
        os.close(write_end)
        try:
            proc.wait(timeout=grace + 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str]) -> int:
    if "--" not in argv or not argv or not argv[0].isdigit():
        print("usage: tether.py FD [--grace S] [--remove PATH]... -- CMD...", file=sys.stderr)
        return 2
    split = argv.index("--")
    opts, cmd = argv[1:split], argv[split + 1:]
    remove, grace = [], GRACE_S
    while opts:
        flag, value, opts = opts[0], opts[1], opts[2:]
        if flag == "--remove":
            remove.append(value)
        elif flag == "--grace":
            grace = float(value)
        else:
            print(f"tether.py: unknown option {flag}", file=sys.stderr)
            return 2
    return watch(int(argv[0]), cmd, remove, grace)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
