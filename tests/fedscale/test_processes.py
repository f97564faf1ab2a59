"""Process helpers: every process started is stopped, with what it started, by PID."""

import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedscale.exceptions import LaunchError
from fedscale.processes import free_port, join_address, split_address, start, stop, wait_for_port


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _child_pid_file(tmp_path: Path, code: str) -> tuple[list[str], Path]:
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time;"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid));" + code
    )
    return [sys.executable, "-c", script], pid_file


def _wait_for(path: Path) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("new_session", [True, False])
def test_stop_ends_the_process_and_its_children(tmp_path, new_session):
    argv, pid_file = _child_pid_file(tmp_path, "time.sleep(120)")
    process = start(argv, new_session=new_session, log_file=tmp_path / "log")
    child = _wait_for(pid_file)
    assert _running(child)
    stop(process, timeout=5)
    assert process.poll() is not None and not _running(child)


def test_stop_ends_the_group_even_after_its_leader_exited(tmp_path):
    # The leader exits at once, leaving its child orphaned in its process group.
    argv, pid_file = _child_pid_file(tmp_path, "")
    process = start(argv, log_file=tmp_path / "log")
    child = _wait_for(pid_file)
    process.wait(timeout=20)
    assert _running(child)
    stop(process, timeout=5)
    assert not _running(child)


def test_wait_for_port_fails_clearly_when_the_process_dies(tmp_path):
    process = start([sys.executable, "-c", "raise SystemExit(3)"], log_file=tmp_path / "log")
    with pytest.raises(LaunchError, match=r"exited with code 3 before listening"):
        wait_for_port("127.0.0.1", free_port(), timeout=20, process=process, what="thing")
    stop(process)


def test_wait_for_port_puts_the_end_of_the_log_in_its_error(tmp_path):
    log = tmp_path / "log"
    process = start(
        [
            sys.executable,
            "-c",
            "import sys; print('bind: address in use', file=sys.stderr); raise SystemExit(2)",
        ],
        log_file=log,
    )
    with pytest.raises(LaunchError, match=r"(?s)exited with code 2 .*bind: address in use"):
        wait_for_port("127.0.0.1", free_port(), timeout=20, process=process, log_file=log)
    stop(process)


def test_free_ports_come_from_below_the_ephemeral_range_and_can_be_bound():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    # An outgoing connection's local port comes from [low, high]: none of these can be one.
    assert all(20_000 <= port < low for port in ports), (low, ports)  # above Ray's workers'
    assert len(set(ports)) > 1  # picked at random, so two tests rarely pick alike
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_port_never_hands_out_a_recent_port_again(monkeypatch):
    # Every random draw lands on the same port: the second caller must get another
    # one, because the first has not bound it yet and it still looks free.
    import fedscale.processes as processes

    first = free_port()

    class SameDraw(random.SystemRandom):
        def choice(self, seq):
            return first

    monkeypatch.setattr(processes.random, "SystemRandom", SameDraw)
    second = free_port()
    assert second != first
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", second))
    many = [free_port() for _ in range(300)]
    assert first not in many and second not in many and len(set(many)) == 300


def test_another_process_is_not_handed_a_port_this_one_was_given():
    # The deployment doc's test picks the server's ports, then starts edge clients
    # that each pick their own: a pick in another process must avoid ours too.
    ours = free_port()
    script = (
        "import random, fedscale.processes as p\n"
        "class SameDraw(random.SystemRandom):\n"
        f"    def choice(self, seq): return {ours}\n"
        "p.random.SystemRandom = SameDraw\n"
        "print(p.free_port())\n"
    )
    theirs = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(theirs.stdout) != ours


def test_an_expired_reservation_is_taken_over(monkeypatch):
    import fedscale.processes as processes

    port = free_port()
    monkeypatch.setattr(processes, "_RESERVATION_SECONDS", 0.0)

    class SameDraw(random.SystemRandom):
        def choice(self, seq):
            return port

    monkeypatch.setattr(processes.random, "SystemRandom", SameDraw)
    assert free_port() == port


def test_wait_for_port_sees_a_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_port("127.0.0.1", server.getsockname()[1], timeout=5)


def test_addresses():
    assert split_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert split_address("[::1]:9092") == ("::1", 9092)
    assert join_address("::1", 8000) == "[::1]:8000" and join_address("h", 1) == "h:1"
    with pytest.raises(LaunchError, match="HOST:PORT"):
        split_address("localhost:99999")
