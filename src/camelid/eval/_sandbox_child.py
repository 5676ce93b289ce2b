"""The sandbox's inside: the script :func:`camelid.eval.sandbox.run_untrusted` starts as
``python -I -B -u -X utf8 _sandbox_child.py CONFIG``; never imported by camelid.

It runs in the fresh interpreter, before any untrusted code, and uses the standard library only
(``-I`` keeps camelid and the caller's environment out of it). In order:

1. resource limits (CPU time, address space, file size, open files, processes, no core dumps);
2. new network and PID namespaces when the kernel allows it (Linux, root): no interface but a
   loopback that is down, and a process tree the kernel kills and reaps as one when its first
   process dies; that first process runs the program, and this script's process waits for it;
3. the guard: an audit hook (``sys.addaudithook``, which cannot be removed from Python) that
   refuses sockets' connect/bind/send-to and name look-ups, new processes, signals to other
   processes, writes, deletions and renames outside the working directory, ctypes, changes to
   resource limits and the gc's object walks; plus the few C entry points that raise no audit
   event (``_posixsubprocess.fork_exec``, ``os.open`` with ``dir_fd``, ``os.mknod``/``mkfifo``)
   replaced by checked versions;
4. the program, compiled as ``program.py`` and run as ``__main__``.

Everything it learns goes to the parent as JSON lines on the report pipe (``report_fd``): the
isolation in force, each refusal (the first few), the program's exception, and ``done`` when the
program ran to its end. A refusal is reported even if the program catches the exception.
"""

import contextlib
import json
import math
import os
import resource
import signal
import stat
import sys

HERE = os.path.abspath(__file__)
PROGRAM = "program.py"  # the program's file name in tracebacks
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
MAX_REPORTED = 20  # refusals sent one by one; the rest are counted (the pipe must never fill)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PROCESS_EVENTS = (
    "os.exec",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.startfile",
    "os.system",
    "subprocess.Popen",
)
NETWORK_EVENTS = (
    "socket.bind",
    "socket.connect",
    "socket.getaddrinfo",
    "socket.gethostbyaddr",
    "socket.gethostbyname",
    "socket.getnameinfo",
    "socket.sendmsg",
    "socket.sendto",
    "socket.sethostname",
)
OTHER_REFUSED = (
    "gc.get_objects",
    "gc.get_referents",
    "gc.get_referrers",
    "resource.prlimit",
    "resource.setrlimit",
    "sqlite3.enable_load_extension",
)
# Modules that write files or talk to sockets from C without an audit event, and modules whose
# functions the guard replaced (a fresh import would bring the originals back).
REFUSED_IMPORTS = frozenset({"_dbm", "_gdbm", "syslog", "posix", "_posixsubprocess"})


class SandboxRefusal(PermissionError):
    """What the guard raises instead of doing a refused operation."""


def main() -> None:
    cfg = json.loads(sys.argv[1])
    script_dir = os.path.dirname(HERE)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != script_dir]
    report = cfg["report_fd"]
    os.set_blocking(report, False)

    def send(**message: object) -> None:
        with contextlib.suppress(OSError, TypeError, ValueError):
            os.write(report, (json.dumps(message, default=repr) + "\n").encode())

    set_limits(cfg)
    isolation = ["rlimits", "session"]
    namespaces = unshare() if cfg["namespaces"] else set()
    isolation += sorted(namespaces)
    isolation.append("guard" if not cfg["allow_subprocesses"] else "guard-without-process-checks")
    send(isolation=isolation)
    if "pid-namespace" in namespaces:
        child = os.fork()
        if child:
            send(init=child)  # killed first on a timeout, so that this process can reap it
            supervise(child, send)  # never returns
        # The first process of the new namespace: when it ends, the kernel ends the others.
        # It dies with the supervisor too, even if it leaves the process group.
        prctl_pdeathsig()
    install_guard(os.path.realpath(os.getcwd()), cfg["allow_subprocesses"], send)
    run(cfg["program"], send)


def set_limits(cfg: dict) -> None:
    cpu = max(1, math.ceil(cfg["cpu_s"]))
    limits = [
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_AS, cfg["memory_bytes"]),
        (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
        (resource.RLIMIT_NOFILE, cfg["max_files"]),
    ]
    if hasattr(resource, "RLIMIT_NPROC"):  # root ignores it; the guard refuses forks anyway
        limits.append((resource.RLIMIT_NPROC, cfg["max_processes"]))
    for which, value in limits:
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    # Soft limit = hard limit: the kernel sends SIGKILL at once (a SIGXCPU could be caught, and
    # the first process of a PID namespace ignores it).
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    cpu = cpu if hard == resource.RLIM_INFINITY else min(cpu, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def unshare() -> set[str]:
    """New network and PID namespaces where permitted (root with CAP_SYS_ADMIN); else none."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        _, libc = _libc()
    except (ImportError, OSError):
        return set()
    if libc.unshare(CLONE_NEWNET | CLONE_NEWPID) == 0:
        return {"network-namespace", "pid-namespace"}
    if libc.unshare(CLONE_NEWNET) == 0:
        return {"network-namespace"}
    return set()


def prctl_pdeathsig() -> None:
    try:
        _, libc = _libc()
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (ImportError, OSError):
        pass


def supervise(child: int, send) -> None:
    """Wait for the program's process (outside its namespace, beyond its reach) and pass on
    how it ended."""
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    send(exit=code)
    os._exit(code if code >= 0 else 128 - code)


# ----------------------------------------------------------------------------------- the guard
def install_guard(root: str, allow_subprocesses: bool, send) -> None:
    refused = [0]

    def refuse(what: str) -> None:
        refused[0] += 1
        if refused[0] <= MAX_REPORTED:
            send(refused=what)
        elif refused[0] == MAX_REPORTED + 1:
            send(refused="(further refusals not listed)")
        raise SandboxRefusal(f"sandbox refused {what}")

    def inside(path: str | None) -> bool:
        return path is not None and (path == root or path.startswith(root + os.sep))

    def fd_path(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def resolve(path, dir_fd=None, follow: bool = True) -> str | None:
        """The absolute path an operation on ``path`` touches (None: cannot tell)."""
        try:
            if isinstance(path, int):
                return fd_path(path)
            path = os.fsdecode(os.fspath(path))
            if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
                path = os.path.join(fd_path(dir_fd), path)  # audit events say -1 for none
            if follow:
                return os.path.realpath(path)
            head, tail = os.path.split(os.path.abspath(path))
            return os.path.join(os.path.realpath(head), tail)
        except (OSError, TypeError, ValueError):
            return None

    def why_not(path, dir_fd=None, follow: bool = True) -> str | None:
        """Why the program may not change ``path`` (None: it may)."""
        target = resolve(path, dir_fd, follow)
        if target == os.devnull:
            return None
        if not inside(target):
            return "outside the sandbox directory"
        try:  # a device node made inside the directory must not become a way out
            mode = os.stat(target).st_mode
        except OSError:
            return None
        return "a device file" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else None

    def check_paths(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(flags, int):
                writes = flags & WRITE_FLAGS
            else:
                writes = set(mode or "") & set("wax+")
            if writes and not isinstance(path, int) and (why := why_not(path)):
                refuse(f"open({path!r}) for writing: {why}")
            return
        if event in ("os.rename", "os.link"):
            src, dst, src_dir_fd, dst_dir_fd = args
            follow = event == "os.link"  # a hard link to a file outside would be a way out
            why = why_not(src, src_dir_fd, follow) or why_not(dst, dst_dir_fd, False)
        elif event == "os.symlink":
            why = why_not(args[1], args[2], False)
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree"):
            why = why_not(args[0], args[1] if len(args) > 1 else None, False)
        elif event in ("os.mkdir", "os.chmod", "os.utime"):
            why = why_not(args[0], args[-1], event != "os.mkdir")
        elif event == "os.chown":
            why = why_not(args[0], args[3])
        else:  # os.truncate, os.chflags, os.lchflags, os.setxattr, os.removexattr
            why = why_not(args[0])
        if why:
            target = args[1] if event == "os.symlink" else args[0]
            refuse(f"{event}({target!r}): {why}")

    path_events = {
        "open",
        "os.chflags",
        "os.chmod",
        "os.chown",
        "os.lchflags",
        "os.link",
        "os.mkdir",
        "os.remove",
        "os.removexattr",
        "os.rename",
        "os.rmdir",
        "os.setxattr",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
    }
    process_events = frozenset(() if allow_subprocesses else PROCESS_EVENTS)
    other = frozenset(NETWORK_EVENTS + OTHER_REFUSED)
    refused_imports = REFUSED_IMPORTS - ({"_posixsubprocess"} if allow_subprocesses else set())
    own_group = os.getpgrp()

    def hook(event: str, args: tuple) -> None:
        if event in path_events:
            check_paths(event, args)
        elif event in process_events:
            refuse(f"{event} (no new processes)")
        elif event in other:
            refuse(f"{event}{_short(args)}")
        elif event.startswith("ctypes."):
            refuse(f"{event} (no ctypes)")
        elif event == "import" and args[0] in refused_imports:
            refuse(f"import {args[0]}")
        elif event == "os.kill":
            pid = args[0]
            ours = allow_subprocesses and pid > 0 and _group(pid) == own_group
            if pid != os.getpid() and not ours:
                refuse(f"os.kill({pid}) (only this process may be signalled)")
        elif event == "os.killpg" and not (allow_subprocesses and args[0] == own_group):
            refuse(f"os.killpg({args[0]})")
        elif event == "sqlite3.connect":
            name = args[0]
            if name not in (":memory:", "", b":memory:", b"") and (why := why_not(name)):
                refuse(f"sqlite3.connect({name!r}): {why}")

    replace_unaudited(why_not, refuse, allow_subprocesses)
    sys.addaudithook(hook)


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _short(args: tuple) -> str:
    text = repr(args)
    return text if len(text) <= 120 else text[:117] + "..."


def replace_unaudited(why_not, refuse, allow_subprocesses: bool) -> None:
    """Checked versions of C functions that write or start processes without an audit event."""
    import posix

    real_open, real_mknod, real_mkfifo = posix.open, posix.mknod, posix.mkfifo

    def checked_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and flags & WRITE_FLAGS and (why := why_not(path, dir_fd)):
            refuse(f"os.open({path!r}, dir_fd={dir_fd}) for writing: {why}")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def checked_mknod(path, mode=0o600, device=0, *, dir_fd=None):
        if why := why_not(path, dir_fd, False):
            refuse(f"os.mknod({path!r}): {why}")
        return real_mknod(path, mode, device, dir_fd=dir_fd)

    def checked_mkfifo(path, mode=0o666, *, dir_fd=None):
        if why := why_not(path, dir_fd, False):
            refuse(f"os.mkfifo({path!r}): {why}")
        return real_mkfifo(path, mode, dir_fd=dir_fd)

    for module in (posix, os):
        module.open, module.mknod, module.mkfifo = checked_open, checked_mknod, checked_mkfifo
    if hasattr(signal, "pidfd_send_signal"):

        def no_pidfd_signal(*args, **kwargs):
            refuse("signal.pidfd_send_signal (only this process may be signalled)")

        signal.pidfd_send_signal = no_pidfd_signal
    if not allow_subprocesses:
        import _posixsubprocess

        def no_fork_exec(*args, **kwargs):
            refuse("_posixsubprocess.fork_exec (no new processes)")

        _posixsubprocess.fork_exec = no_fork_exec


# --------------------------------------------------------------------------------- the program
def run(program_path: str, send) -> None:
    import builtins
    import linecache

    try:
        with open(program_path, encoding="utf-8") as f:
            source = f.read()
        linecache.cache[PROGRAM] = (len(source), None, source.splitlines(True), PROGRAM)
        code = compile(source, PROGRAM, "exec")
        namespace = {"__name__": "__main__", "__file__": PROGRAM, "__builtins__": builtins}
        del source
        exec(code, namespace)
    except BaseException as e:  # the program's failure, whatever it is, is its result
        report_exception(e, send)
        os._exit(1)
    send(done=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)  # the program's end is the verdict: no atexit handlers, no lingering threads


def report_exception(e: BaseException, send) -> None:
    message = str(e.code) if isinstance(e, SystemExit) else str(e)
    errno = getattr(e, "errno", None)
    send(exception={"type": type(e).__name__, "message": message[:500], "errno": errno})
    try:
        import traceback

        te = traceback.TracebackException(type(e), e, e.__traceback__, compact=True)
        _strip_own_frames(te, set())
        sys.stderr.write("".join(te.format()))
        sys.stderr.flush()
    except BaseException:
        pass


def _strip_own_frames(te, seen: set[int]) -> None:
    """Drop this script's frames (the sandbox's machinery) from a traceback and its chain."""
    import traceback

    if te is None or id(te) in seen:
        return
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename != HERE])
    _strip_own_frames(te.__cause__, seen)
    _strip_own_frames(te.__context__, seen)


if __name__ == "__main__":
    main()
