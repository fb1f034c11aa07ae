"""A Ray head of the tests' own, for the tests that run `ray start`: its own temporary folder, free ports
and HOME (its auth token is written to <home>/.ray/auth_token and named by RAY_AUTH_TOKEN_PATH, never
the user's ~/.ray/auth_token, which is neither read nor rewritten), and a stop
that ends only the processes it started (found by the temporary folder in their command lines), never
`ray stop`, which ends every Ray process on the machine."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
PORT_FLAGS = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
              "--runtime-env-agent-port", "--ray-client-server-port")
WORKER_PORTS = 40  # --min-worker-port .. --max-worker-port: a free range of this many ports


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together while chosen, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_range(width: int) -> int:
    """The first port of `width` consecutive ports that are all free now (from a random start)."""
    import random
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 30000 - width)
        try:
            socks = []
            for p in range(first, first + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {width} consecutive free ports")


def _read(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def pids_with(marker: str, environ: bool = True) -> set[int]:
    """The processes whose command line (or environment, with environ) holds marker, read from /proc. A
    head's processes have its temp dir in one or the other: workers rename themselves (ray::IDLE), but
    inherit the environment."""
    found, needle = set(), marker.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and (
                needle in _read(entry, "cmdline") or environ and needle in _read(entry, "environ")):
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def terminate(pids: set[int], timeout: float = 30.0) -> set[int]:
    """SIGTERM to each of pids, SIGKILL to those still alive after timeout; returns those never ended."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if alive(p)}
        if not pids:
            break
    return pids


@dataclass
class Head:
    """One `ray start --head` of our own: the temporary folder, the private HOME, the ports, the env."""
    temp_dir: str
    home: str
    ports: dict
    env: dict
    started: set = field(default_factory=set)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def pids(self) -> set[int]:
        """Every process of this head now (its temporary folder in the command line)."""
        return pids_with(self.temp_dir)

    def services(self) -> set[int]:
        """The head's services (GCS, raylet, dashboard, monitors: the temp dir in their command lines),
        not its workers, which come and go."""
        return pids_with(self.temp_dir, environ=False)


def _new_token(home: str) -> str:
    """A fresh token (256 random bits in hex, as Ray generates them) in ``home``/.ray/auth_token, readable
    by the owner only; its path. Written here, never by Ray's own token generator, which writes the token
    file of whatever HOME it runs under."""
    import secrets
    path = os.path.join(home, ".ray", "auth_token")
    os.makedirs(os.path.dirname(path), mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def start_head(num_cpus: int = 1, token: bool = False, dashboard: bool = True, timeout: float = 180) -> Head:
    """`ray start --head` on loopback with its own temp dir (a short path: Ray's socket paths are limited
    to about 107 bytes), ports and HOME; with token, RAY_AUTH_MODE=token and a token of its own in HOME;
    without dashboard, no dashboard (no job submission; starts faster)."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/pcr")
    home = os.path.join(temp_dir, "home")
    os.makedirs(home)
    env = dict(os.environ, HOME=home, RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # a token of the user's environment is not this head's
    if token:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = _new_token(home)
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    first = _port_range(WORKER_PORTS)
    head = Head(temp_dir, home, ports, env)
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--temp-dir", temp_dir, "--min-worker-port", str(first),
           "--max-worker-port", str(first + WORKER_PORTS - 1), "--disable-usage-stats",
           f"--include-dashboard={str(dashboard).lower()}"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except BaseException:
        stop_head(head)
        raise
    if r.returncode != 0:
        stop_head(head)
        raise AssertionError(f"ray start failed: {r.stdout[-3000:]}{r.stderr[-3000:]}")
    head.started = head.pids()
    return head


def stop_head(head: Head, timeout: float = 5.0) -> None:
    """End this head's processes only (SIGTERM, then SIGKILL after ``timeout``: the GCS and raylet often
    outlast a SIGTERM by half a minute, and a test head has nothing to save), then remove its folder."""
    left = terminate(head.pids() | head.started, timeout)
    left |= terminate(head.pids(), timeout)  # any started while the first ones stopped
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert not left, f"processes of the test's Ray head still alive: {sorted(left)}"


_LOCAL_TEMP: list[str] = []  # the session's local instance's temporary folder (made once)


USER_TOKEN_AT_START: list[bool] = []  # whether ~/.ray/auth_token existed when the test session began


def use_own_token() -> None:
    """Point this test process (and the processes it starts) at an auth token of its own, in a temporary
    HOME-like folder removed at exit, unless the environment already names one: a Ray instance that
    starts in token mode without a token otherwise writes the user's shared ~/.ray/auth_token."""
    import atexit
    USER_TOKEN_AT_START.append(os.path.exists(os.path.expanduser("~/.ray/auth_token")))
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    home = tempfile.mkdtemp(prefix="/tmp/pct")
    atexit.register(shutil.rmtree, home, True)
    os.environ["RAY_AUTH_TOKEN_PATH"] = _new_token(home)


def init_local_ray():
    """The session's local Ray instance: address="local" always starts a new instance of our own (never
    another process's cluster on this machine, RAY_ADDRESS or not), in its own temporary folder."""
    import ray
    if not _LOCAL_TEMP:
        _LOCAL_TEMP.append(tempfile.mkdtemp(prefix="/tmp/pcr"))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
                 _temp_dir=_LOCAL_TEMP[0])
    return ray


def remove_local_temp() -> None:
    """After the session's ray.shutdown(): its temporary folder."""
    for path in _LOCAL_TEMP:
        shutil.rmtree(path, ignore_errors=True)
