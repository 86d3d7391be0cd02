"""Keeps a stack of local processes running: each started once the one before it serves, each
started again when it dies, all stopped last first."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

RESTART_BACKOFF_S = 0.5  # the first wait before a dead process is started again; doubles per death
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0  # a process up this long starts its next back-off afresh
START_FAILURES = 5  # deaths before serving, in a row, after which the stack goes down


class Child:
    """One process of the stack: command, port, the process running it (None during a back-off), restarts."""

    def __init__(self, cmd: list[str], port: int, backoff: float):
        self.cmd, self.port, self.backoff = cmd, port, backoff
        self.name = f"{cmd[3] if len(cmd) > 3 else cmd[0]} on port {port}"
        self.proc: subprocess.Popen | None = None
        self.ready_at: float | None = None  # when this process first served
        self.error: Exception | None = None  # why this process never served
        self.restart_at, self.restarts, self.failures = 0.0, 0, 0  # failures: deaths before serving, in a row


def exit_reason(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def log(message: str) -> None:
    print(f"smartspec up: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Starts the processes in order, each once the one before it serves, then keeps them running: one
    that dies is started again with the same command after a back-off that doubles up to `max_backoff`
    and starts afresh once it has stayed up `stable_after` s. The stack goes down on `stop()`, when a
    process fails during the first start, or when one dies before serving `start_failures` times in a row.

    `ready(port, proc, timeout)` returns once `proc` serves on `port` and raises if it never does
    (`wait_serving`); it runs on a thread of its own so that one slow start holds up nothing else."""

    def __init__(
        self,
        procs: list[tuple[list[str], int]],
        ready: Callable[[int, subprocess.Popen, float], None],
        startup_timeout: float = 300.0,
        backoff: float = RESTART_BACKOFF_S,
        max_backoff: float = MAX_BACKOFF_S,
        stable_after: float = STABLE_AFTER_S,
        start_failures: int = START_FAILURES,
        stop_timeout: float = 60.0,
        poll: float = 0.2,
        env: dict[str, str] | None = None,
    ):
        self.children = [Child(cmd, port, backoff) for cmd, port in procs]
        self.ready, self.startup_timeout, self.poll = ready, startup_timeout, poll
        self.initial_backoff, self.max_backoff, self.stable_after = backoff, max_backoff, stable_after
        self.start_failures, self.stop_timeout = start_failures, stop_timeout
        self.stopping = False
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}

    def stop(self, *_) -> None:
        self.stopping = True

    def serve(self, on_up: Callable[[], None] = lambda: None) -> int:
        """`run`, stopped by SIGTERM or SIGINT (Ctrl-C) instead of dying of them."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self.run(on_up)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, on_up: Callable[[], None] = lambda: None) -> int:
        """0 once stopped and every process has exited cleanly; 1 when the stack went down by itself."""
        try:
            for i, child in enumerate(self.children):
                self._spawn(child)
                while not self.stopping and child.ready_at is None:
                    for started in self.children[: i + 1]:
                        if started.proc.poll() is not None or started.error is not None:
                            reason = started.error or exit_reason(started.proc.returncode)
                            log(f"{started.name} failed to start: {reason}")
                            return 1
                    time.sleep(self.poll)
            if not self.stopping:
                on_up()
            while not self.stopping:
                if not all(self._check(child) for child in self.children):
                    return 1
                time.sleep(self.poll)
        finally:
            clean = self.shutdown()
        return 0 if clean else 1

    def _spawn(self, child: Child) -> None:
        proc = subprocess.Popen(child.cmd, env=self.env)
        child.proc, child.ready_at, child.error = proc, None, None

        def probe() -> None:
            try:
                self.ready(child.port, proc, self.startup_timeout)
            except Exception as e:  # noqa: BLE001 - any failure to serve counts as a failed start
                if child.proc is proc:
                    child.error = e
            else:
                if child.proc is proc:
                    child.ready_at = time.monotonic()

        threading.Thread(target=probe, daemon=True, name=f"ready {child.name}").start()

    def _check(self, child: Child) -> bool:
        """Restarts `child` if it is due; False when it has failed to start too often."""
        now = time.monotonic()
        if self.stopping:  # Ctrl-C reaches the children too: their exits are no failures
            return True
        if child.proc is None:
            if now >= child.restart_at:
                self._spawn(child)
                child.restarts += 1
                log(f"{child.name} started again as pid {child.proc.pid} (restart {child.restarts})")
            return True
        if child.proc.poll() is None:
            if child.error is None:
                return True
            log(f"{child.name} did not serve: {child.error}; killing it")
            child.proc.kill()
            child.proc.wait()
        served = child.ready_at is not None
        child.failures = 0 if served else child.failures + 1
        reason = f"{child.name} (pid {child.proc.pid}) {exit_reason(child.proc.returncode)}"
        reason += "" if served else f" before serving ({child.failures} in a row)"
        if child.failures >= self.start_failures:
            log(f"{reason}; giving up, the stack goes down")
            return False
        if served and now - child.ready_at >= self.stable_after:
            child.backoff = self.initial_backoff
        delay, child.backoff = child.backoff, min(2 * child.backoff, self.max_backoff)
        child.proc, child.restart_at = None, now + delay
        log(f"{reason}; restarting it in {delay:g} s")
        return True

    def shutdown(self) -> bool:
        """Stops the processes last first, the verifier draining while its proposers serve; True if all ended well."""
        clean = True
        for p in [child.proc for child in reversed(self.children) if child.proc is not None]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            clean = clean and p.returncode in (0, -signal.SIGTERM)
        return clean
