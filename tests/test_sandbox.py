"""The sandbox for model-written code: a correct program passes, a wrong one fails, and each
thing it must stop (a wall-clock loop, a CPU-bound loop, a fork bomb, a huge allocation, a
network connection, a write outside its directory, a grandchild that outlives its parent) is
stopped, with the evidence checked from outside (the server saw no connection, the file does
not exist, /proc holds none of its processes).

Where the kernel allows it (root here), the sandbox adds network and PID namespaces; the tests
that depend on the fallback without them run both ways.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from camelid import RequestError
from camelid.eval.sandbox import run_untrusted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

BOTH = pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "guard-only"])


def processes_in_group(pgid: int) -> dict[int, str]:
    """pid -> state of every process of group ``pgid``, straight from /proc (zombies too)."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                found[int(name)] = fields[0]
    return found


def assert_group_gone(result) -> None:
    """No process of the run's group is left running; with a PID namespace (the kernel reaps
    the whole tree) none is left at all, not even a zombie."""
    assert result.pid is not None
    members = processes_in_group(result.pid)
    assert all(state in "ZX" for state in members.values()), members
    if "pid-namespace" in result.isolation:
        assert members == {}


def run(source: str, **kwargs):
    return run_untrusted(textwrap.dedent(source), **kwargs)


def test_correct_program_passes():
    r = run(
        """
        def add(a, b):
            return a + b
        assert add(2, 3) == 5
        print("ok")
        """,
        timeout_s=10,
    )
    assert r.status == "passed" and r.passed, r
    assert r.returncode == 0 and r.error is None
    assert r.stdout == "ok\n"
    assert "guard" in r.isolation and "rlimits" in r.isolation


def test_wrong_program_fails_with_its_own_traceback_only():
    r = run(
        """
        def add(a, b):
            return a - b
        assert add(2, 3) == 5, "add is wrong"
        """
    )
    assert r.status == "failed" and not r.passed
    assert r.returncode == 1
    assert r.error == "AssertionError: add is wrong"
    assert 'File "program.py", line 4' in r.stderr
    assert "_sandbox_child" not in r.stderr and "camelid" not in r.stderr  # none of our frames


def test_syntax_error_fails():
    r = run("def f(:\n    pass\n")
    assert r.status == "failed" and r.error.startswith("SyntaxError")


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)"])
def test_exiting_before_the_end_is_not_a_pass(exit_call):
    # A completion must not pass by leaving before check() runs.
    r = run(f"{exit_call}\nassert False\n")
    assert r.status == "failed", r


def test_infinite_loop_times_out():
    start = time.monotonic()
    r = run("while True:\n    pass\n", timeout_s=1.5, cpu_s=60)
    assert r.status == "timeout", r
    assert r.returncode is None
    assert 1.5 <= r.wall_s < 1.5 + 3.0
    assert time.monotonic() - start < 1.5 + 4.0
    assert_group_gone(r)


def test_cpu_burning_loop_hits_the_cpu_limit():
    r = run("x = 0\nwhile True:\n    x += 1\n", timeout_s=60, cpu_s=1)
    assert r.status == "cpu", r
    assert r.cpu_s >= 0.9
    assert r.wall_s < 20  # far from the 60 s wall-clock limit
    assert_group_gone(r)


@pytest.mark.parametrize(
    "bomb",
    [
        "import os\nwhile True:\n    os.fork()\n",
        # one that ignores refusals and keeps trying, through every door it knows
        """
        import os, subprocess, multiprocessing
        while True:
            for attempt in (os.fork, lambda: subprocess.Popen(["true"]),
                            lambda: multiprocessing.Process(target=print).start(),
                            lambda: os.posix_spawn("/bin/true", ["true"], {})):
                try:
                    attempt()
                except Exception:
                    pass
        """,
    ],
    ids=["plain", "persistent"],
)
def test_fork_bomb_is_refused_and_leaves_nothing(bomb):
    r = run(bomb, timeout_s=1)
    assert r.status == "refused", r
    assert any("no new processes" in x for x in r.refused)
    assert_group_gone(r)


def test_huge_allocation_hits_the_memory_limit():
    r = run("x = bytearray(10 * 1024**3)\nprint('allocated')\n", memory_bytes=1024**3)
    assert r.status == "memory", r
    assert "allocated" not in r.stdout


@BOTH
def test_network_connection_is_refused(namespaces):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        r = run(
            f"""
            import socket
            s = socket.socket()
            s.settimeout(2)
            s.connect(("127.0.0.1", {port}))
            s.sendall(b"leak")
            """,
            namespaces=namespaces,
        )
        assert r.status == "refused", r
        assert any(x.startswith("socket.connect") for x in r.refused)
        with pytest.raises(TimeoutError):
            server.accept()  # the server never saw a connection
    if namespaces and "network-namespace" in r.isolation:
        # Even past the guard there is no network: only a loopback interface, and it is down.
        r = run("import socket\nprint(socket.if_nameindex())\n")
        assert r.status == "passed" and r.stdout.strip() == "[(1, 'lo')]", r


def test_write_outside_the_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    r = run(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "refused", r
    assert not target.exists()
    # nor by the other doors: a symlink out, a rename out, os.open relative to a directory fd
    for source in (
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')\n",
        f"open('here', 'w').write('x')\nimport os\nos.rename('here', {str(target)!r})\n",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
    ):
        r = run(source)
        assert r.status == "refused", (source, r)
        assert not target.exists(), source


def test_writes_inside_the_directory_work_and_it_is_removed_after():
    r = run(
        """
        import os, tempfile
        open("notes.txt", "w").write("kept")
        with tempfile.TemporaryDirectory() as d:  # TMPDIR is the sandbox directory too
            open(os.path.join(d, "scratch"), "w").write("x")
        print(os.getcwd())
        print(open("notes.txt").read())
        """
    )
    assert r.status == "passed", r
    cwd, content = r.stdout.split()
    assert content == "kept"
    assert not Path(cwd).exists()


@BOTH
def test_grandchild_that_outlives_its_parent_is_killed(namespaces):
    # The program starts a child that starts a sleeping grandchild and exits; the program
    # waits until the grandchild is up, then ends. Nothing of it may survive the run.
    r = run(
        """
        import os, subprocess, sys, time
        grandchild = "import pathlib, time; pathlib.Path('up').touch(); time.sleep(60)"
        child = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}])"
        subprocess.run([sys.executable, "-c", child], check=True)
        while not os.path.exists("up"):
            time.sleep(0.01)
        print("grandchild up")
        """,
        timeout_s=30,
        allow_subprocesses=True,
        namespaces=namespaces,
    )
    assert r.status == "passed", r
    assert r.stdout == "grandchild up\n"
    assert r.wall_s < 20  # not the grandchild's 60 s
    assert_group_gone(r)


def test_clean_environment(monkeypatch):
    monkeypatch.setenv("CAMELID_TEST_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nowhere")
    r = run(
        """
        import os, sys
        print(sorted(k for k in os.environ if "SECRET" in k or k.startswith("PYTHON")))
        print(os.environ["HOME"] == os.getcwd(), sys.flags.isolated, sys.flags.dont_write_bytecode)
        """
    )
    assert r.status == "passed", r
    assert r.stdout.splitlines() == ["[]", "True 1 1"]


def test_a_caught_refusal_still_counts():
    r = run(
        """
        import os
        try:
            os.kill(os.getppid() or 12345, 9)
        except PermissionError:
            pass
        try:
            import ctypes
            ctypes.CDLL(None)
        except PermissionError:
            pass
        """
    )
    assert r.status == "refused", r
    assert len(r.refused) >= 1


def test_bad_limits_are_refused_clearly():
    with pytest.raises(RequestError, match="timeout_s"):
        run_untrusted("pass", timeout_s=0)
    with pytest.raises(RequestError, match="memory_bytes"):
        run_untrusted("pass", memory_bytes=10)
