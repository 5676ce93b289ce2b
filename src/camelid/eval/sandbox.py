"""Run an untrusted Python program (model-written code) in a sandboxed subprocess.

    result = run_untrusted("assert sum([1, 2]) == 3\\n", timeout_s=5)
    result.status        # "passed"; or "failed", "timeout", "cpu", "memory", "refused", ...

This is defence in depth for benchmark code: it keeps a model's honest mistakes (an infinite
loop, a fork bomb, a huge allocation, ``shutil.rmtree("/")``, a stray ``requests.get``) from
hurting the machine or the evaluation. It is NOT a security boundary against a determined
attacker: the guard lives in the same interpreter as the program, and code that knows CPython's
internals (frames, closures, ``_imp``) can undo it. Run code you would not run on your own
machine in a container or VM with no secrets in it.

What it does, layer by layer (Linux; the guard and limits work on any POSIX system):

- A fresh temporary directory as the working directory, ``HOME`` and ``TMPDIR``, removed
  afterwards; a clean environment (nothing inherited: no tokens, no ``PYTHON*``), the
  interpreter in isolated mode (``-I``: no user site, no ``PYTHONPATH``, script directory not on
  ``sys.path``), no bytecode writes (``-B``), stdin from ``/dev/null``.
- Its own session and process group; at the end (or on the wall-clock timeout) the whole group
  is sent SIGKILL, and what is left of it is swept until none of it runs, so children and
  grandchildren die too.
- Resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_FSIZE (largest
  file, stdout and stderr included), RLIMIT_NOFILE, RLIMIT_NPROC (ignored by the kernel for
  root) and no core dumps.
- Where the kernel permits (root with CAP_SYS_ADMIN): new network and PID namespaces. There is
  no network at all (only a loopback interface that is down), and the program is the first
  process of its own PID namespace: when it dies the kernel kills and reaps everything it
  started, even a process that left the process group. ``SandboxResult.isolation`` says which
  layers were in force ("network-namespace", "pid-namespace"); without them the guard alone
  stands between the program and the network.
- The guard (an audit hook installed before the program runs; see ``_sandbox_child.py``):
  refuses socket connect/bind/sendto and DNS look-ups, new processes (fork, exec, spawn,
  ``subprocess``, ``os.system``, multiprocessing), signals to other processes, opening files for
  writing and deleting, renaming, linking, chmod-ing anything outside the working directory
  (``/dev/null`` excepted), device files, ctypes, changing resource limits, and the gc's
  object walks. A refusal raises ``PermissionError`` in the program and makes the result
  "refused" even if the program catches it.

What it does not stop: reading any file the user running it can read (the program's output
comes back in ``stdout``/``stderr``, so a result file may carry what it read); writes to files
the program is handed by descriptor; a program that tampers with the guard from inside; native
code in C extensions that makes system calls directly; without the namespaces, a process that
leaves the process group after the guard was bypassed. With ``allow_subprocesses=True`` the
guard lets processes start (a new interpreter runs without the guard) and, for root, nothing
bounds how many; only the wall-clock limit and the group kill remain.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from camelid.errors import RequestError

CHILD = Path(__file__).with_name("_sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "cpu", "memory", "refused", "killed", "error")
SWEEP_S = 5.0  # how long to keep killing a process group that will not die


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one program.

    - ``status``: "passed" (ran to its end, exit 0), "failed" (an exception, a ``sys.exit``, or
      an exit before its end), "timeout" (wall-clock limit), "cpu" (CPU-time limit), "memory"
      (``MemoryError`` under the address-space limit), "refused" (the guard refused an
      operation), "killed" (another signal), "error" (the sandbox itself could not run it).
    - ``returncode``: the program's exit status (negative: killed by that signal), None if it
      never ended on its own.
    - ``error``: one line on why it did not pass (the exception, the limit, the refusal).
    - ``stdout``/``stderr``: the last ``output_chars`` characters of each (the program's own
      traceback, with none of the sandbox's frames, is in ``stderr``).
    - ``refused``: the operations the guard refused; ``isolation``: the layers in force.
    - ``pid``: the process (and process-group) id the program ran under.
    """

    status: str
    returncode: int | None
    error: str | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    refused: tuple[str, ...] = ()
    isolation: tuple[str, ...] = ()
    pid: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        """As JSON (lists for the tuples)."""
        d = asdict(self)
        d["refused"], d["isolation"] = list(self.refused), list(self.isolation)
        return d


def run_untrusted(
    program: str,
    *,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_bytes: int = 2 * 1024**3,
    file_bytes: int = 16 * 1024**2,
    max_files: int = 64,
    max_processes: int = 64,
    allow_subprocesses: bool = False,
    namespaces: bool = True,
    output_chars: int = 4000,
    python: str | None = None,
) -> SandboxResult:
    """Run ``program`` (Python source) in a sandboxed subprocess and say how it ended.

    - ``timeout_s``: wall-clock limit; ``cpu_s``: CPU-time limit (default: ``timeout_s``,
      rounded up to whole seconds; the kernel's SIGKILL follows a second after its SIGXCPU).
    - ``memory_bytes``: address space; ``file_bytes``: the largest file it may write (its
      stdout and stderr included); ``max_files``: open descriptors; ``max_processes``: the
      processes and threads of the user (not enforced for root).
    - ``allow_subprocesses``: let it start processes (off for model-written code).
    - ``namespaces``: use network and PID namespaces when the kernel permits.
    - ``python``: the interpreter (default: this one), started in isolated mode.

    Thread-safe: run several at once from a thread pool.
    """
    _check_limits(timeout_s, cpu_s, memory_bytes, file_bytes, max_files, max_processes)
    outer = Path(tempfile.mkdtemp(prefix="camelid-sandbox-"))
    start = time.monotonic()
    try:
        return _run(
            program,
            outer,
            start,
            timeout_s=float(timeout_s),
            cfg={
                "cpu_s": float(timeout_s if cpu_s is None else cpu_s),
                "memory_bytes": int(memory_bytes),
                "file_bytes": int(file_bytes),
                "max_files": int(max_files),
                "max_processes": int(max_processes),
                "allow_subprocesses": bool(allow_subprocesses),
                "namespaces": bool(namespaces),
            },
            output_chars=output_chars,
            python=python or sys.executable,
        )
    finally:
        _remove(outer)


def _check_limits(timeout_s, cpu_s, memory_bytes, file_bytes, max_files, max_processes) -> None:
    for name, value in (("timeout_s", timeout_s), ("cpu_s", cpu_s)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise RequestError(f"invalid {name}={value!r}: must be a positive number of seconds")
    for name, value, low in (
        ("memory_bytes", memory_bytes, 64 * 1024**2),
        ("file_bytes", file_bytes, 1024),
        ("max_files", max_files, 16),
        ("max_processes", max_processes, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise RequestError(f"invalid {name}={value!r}: must be an integer >= {low}")


def _run(
    program: str,
    outer: Path,
    start: float,
    *,
    timeout_s: float,
    cfg: dict[str, Any],
    output_chars: int,
    python: str,
) -> SandboxResult:
    # The program's directory (the only place it may write) sits beside what only we write.
    work = outer / "work"
    work.mkdir(mode=0o700)
    source = outer / "program.py"
    source.write_text(program, encoding="utf-8")
    out_path, err_path = outer / "stdout", outer / "stderr"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # numerical libraries a program may import should not spawn a thread per core
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    cfg = {**cfg, "report_fd": write_fd, "program": str(source)}
    argv = [python, "-I", "-B", "-u", "-X", "utf8", str(CHILD), json.dumps(cfg)]
    proc = None
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                )
            except OSError as e:
                return _failed_to_start(f"cannot start {python}: {e}", start)
            finally:
                os.close(write_fd)
        exited = _wait_exit(proc.pid, timeout_s)
    finally:
        leftover = 0
        chunks: list[bytes] = []
        if proc is not None:
            if not exited:  # kill the namespace's first process before its supervisor, which
                # then reaps it: killed together, it would be orphaned and stay a zombie
                _drain(read_fd, chunks)
                init = _parse(chunks).get("init")
                if isinstance(init, int) and init > 1:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(init, signal.SIGKILL)
                    _wait_exit(proc.pid, 2.0)
            _kill_group(proc.pid)  # the leader is not reaped yet, so its group id is still ours
            status, rusage = _reap(proc)
            leftover = _sweep(proc.pid)
        _drain(read_fd, chunks)
        report = _parse(chunks)
        os.close(read_fd)
    wall = time.monotonic() - start
    cpu = rusage.ru_utime + rusage.ru_stime
    stdout, stderr = _tail(out_path, output_chars), _tail(err_path, output_chars)
    returncode = report.get("exit", status) if exited else None
    result_status, error = _verdict(report, exited, returncode, cpu, cfg["cpu_s"], timeout_s)
    if not report.get("isolation") and result_status in ("failed", "killed"):
        result_status, error = "error", "the sandbox did not start: " + _last_line(stderr)
    if leftover:
        error = f"{error or ''}; {leftover} process(es) of its group survived SIGKILL".lstrip("; ")
    return SandboxResult(
        status=result_status,
        returncode=returncode,
        error=error,
        stdout=stdout,
        stderr=stderr,
        wall_s=wall,
        cpu_s=cpu,
        refused=tuple(report.get("refused", ())),
        isolation=tuple(report.get("isolation", ())),
        pid=proc.pid,
    )


def _verdict(
    report: dict[str, Any],
    exited: bool,
    returncode: int | None,
    cpu: float,
    cpu_limit: float,
    timeout_s: float,
) -> tuple[str, str | None]:
    """(status, error) from what the child reported and how it ended."""
    exc = report.get("exception")
    if report.get("refused"):
        return "refused", f"refused: {report['refused'][0]}"
    if not exited:
        return "timeout", f"wall-clock limit of {timeout_s:g} s"
    limit = max(1, math.ceil(cpu_limit))
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and cpu >= limit - 0.05):
        return "cpu", f"CPU-time limit of {limit} s"
    if exc is not None:
        message = f"{exc['type']}: {exc['message']}" if exc.get("message") else exc["type"]
        return ("memory" if exc["type"] == "MemoryError" else "failed"), message
    if returncode is not None and returncode < 0:
        return "killed", f"killed by {_signal_name(-returncode)}"
    if report.get("done") and returncode == 0:
        return "passed", None
    if returncode == 0 or report.get("done"):
        return "failed", f"exited before its end (exit status {returncode})"
    return "failed", f"exit status {returncode}"


def _failed_to_start(message: str, start: float) -> SandboxResult:
    return SandboxResult("error", None, message, "", "", time.monotonic() - start, 0.0)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits (it stays unreaped); False on timeout."""
    deadline = time.monotonic() + timeout_s
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with contextlib.suppress(InterruptedError):
                    if select.select([pidfd], [], [], left)[0]:
                        return True
        finally:
            os.close(pidfd)
    while time.monotonic() < deadline:  # no pidfd: poll without reaping
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.005)
    return False


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reap(proc: subprocess.Popen) -> tuple[int, Any]:
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return proc.returncode, rusage


def group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that still run (zombies, already dead, excluded),
    read from /proc; empty where there is no /proc."""
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


def _sweep(pgid: int) -> int:
    """Kill the group until none of it runs; the number left when giving up."""
    deadline = time.monotonic() + SWEEP_S
    while members := group_members(pgid):
        if time.monotonic() > deadline:
            return len(members)
        _kill_group(pgid)
        time.sleep(0.01)
    return 0


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Append what the child has written to the report pipe so far."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        chunks.append(chunk)


def _parse(chunks: list[bytes]) -> dict[str, Any]:
    """The child's JSON lines, merged: ``refused`` collects, the rest keep the first value."""
    report: dict[str, Any] = {}
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            if key == "refused":
                report.setdefault("refused", []).append(str(value))
            else:
                report.setdefault(key, value)
    return report


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * chars))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-chars:]


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _remove(path: Path) -> None:
    """Remove the temporary directory, whatever modes the program left on it."""

    def retry(func, name, _exc) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, 0o700)
            func(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
