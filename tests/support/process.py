"""Running dbkeeper as a real process: config file, log capture, signals, exit status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table: { column = "created_at", keep_days = 30 }
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class BotProcess:
    """``python -m dbkeeper ARGS`` in ``cwd``; stderr and stdout collected line by line.

    ``program``: another command line to run instead (a user's ``bot.py``, or dbkeeper from
    another virtual environment); it then runs without this checkout on its path.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        program: Sequence[str] | None = None,
    ) -> None:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("DBKEEPER_TEST")}
        environment.pop("TELEGRAM_BOT_TOKEN", None)
        environment.pop("DATABASE_URL", None)
        environment.pop("PYTHONPATH", None)
        if program is None:
            environment["PYTHONPATH"] = str(REPO)
        environment["PYTHONUNBUFFERED"] = "1"
        environment.update(env or {})
        self.args = list(args)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            [*(program or [sys.executable, "-m", "dbkeeper"]), *args],
            cwd=cwd,
            env=environment,
            stdin=subprocess.DEVNULL,  # a prompt gets end-of-file, as in a script
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for_line(self, match: str | Callable[[str], bool], timeout: float = 30.0) -> str:
        """Wait until a line contains ``match`` (or satisfies it); fail if the process exits."""
        predicate = match if callable(match) else (lambda line: match in line)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                finished = self.process.poll() is not None and not self._reader.is_alive()
                remaining = deadline - time.monotonic()
                if finished or remaining <= 0:
                    state = "exited" if finished else "still running"
                    raise AssertionError(
                        f"no line matching {match!r} ({state}, {self.args}); output:\n"
                        + "\n".join(self.lines[-60:])
                    )
                self._changed.wait(min(remaining, 0.5))

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"{self.args} did not exit within {timeout}s; output:\n" + self.output
            ) from None
        self._reader.join(5)
        return code

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.send(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> BotProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()


def run_cli(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
    program: Sequence[str] | None = None,
) -> tuple[int, str]:
    """Run a dbkeeper command to completion; return (exit status, combined output)."""
    with BotProcess(args, cwd=cwd, env=env, program=program) as process:
        code = process.wait(timeout)
        return code, process.output


def start_at_gate(script: str, args: Sequence[str], cwd: Path, what: str) -> subprocess.Popen[str]:
    """``python -c script *args`` (the repository importable, no ``DATABASE_URL``), returned
    once it printed its ``GATE:`` line and waits there; the caller kills it. ``what`` names the
    gate in the error when the process ends before reaching it."""
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("DATABASE_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("GATE:"):
            return process
    raise AssertionError(f"the process ended before {what}: {process.wait()}")
