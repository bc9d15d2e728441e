"""``triton serve``: find a ``tritonserver``, prepare its python backend, run it on loopback, stop it for sure.

Where the binary comes from, in order: an explicit path; ``tritonserver`` on ``PATH`` or
``/opt/tritonserver/bin`` (the NGC container) with its own ``backends/``; else the binary inside the
``nvidia-pytriton`` wheel. The wheel ships the python backend without its stub: the stub built for
this interpreter's Python (``python_backend_stubs/X.Y/``) is copied into the wheel's
``backends/python/`` when that directory is writable, else into a private copy of the backends under
the user cache (``$XDG_CACHE_HOME/conceptseg-edge/triton-backends/``). ``LD_LIBRARY_PATH`` gets the
wheel's ``nvidia_pytriton.libs`` (and this interpreter's ``libpython`` first, so the stub embeds the
same Python build); ``PATH`` starts with this interpreter's ``bin`` so the embedded Python resolves
the same prefix (a virtual environment included), and ``CONCEPTSEG_EDGE_SITE`` lists this
interpreter's site directories for the generated ``model.py`` files to add.

``TritonServer`` starts the process in its own session (process group), waits for
``/v2/health/ready``, and on ``stop()`` (or leaving the ``with`` block, or interpreter exit) sends
SIGTERM to the whole group, then SIGKILL after a grace period, so no stub outlives it.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conceptseg_edge.errors import ConceptsegError, InputError
from conceptseg_edge.fileio import atomic_path, sha256_file
from conceptseg_edge.serve.gateway import GatewayLimits, HttpGateway

LOOPBACK = "127.0.0.1"
STUB_NAME = "triton_python_backend_stub"
SYSTEM_LOCATIONS = (Path("/opt/tritonserver/bin/tritonserver"),)


class ServerStartError(ConceptsegError):
    """``tritonserver`` could not be found, prepared, started, or did not become ready; carries the log tail."""


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and what it needs to run the python backend."""

    binary: Path
    backends: Path  # the backends directory as installed
    source: str  # "explicit", "system" or "pytriton"
    libs: Path | None = None  # nvidia_pytriton.libs
    stub: Path | None = None  # stub to place into backends/python (wheel installs only)


def _pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    dist = root / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        raise ServerStartError(f"{stub}: the nvidia-pytriton wheel has no python backend stub for Python {version}")
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, dist / "backends", "pytriton", libs if libs.is_dir() else None, stub)


def _system_install(binary: Path, source: str) -> TritonInstall:
    binary = binary.resolve()
    backends = binary.parent.parent / "backends"
    if not (backends / "python").is_dir():
        raise ServerStartError(f"{binary}: no python backend under {backends} (needed by the conceptseg model)")
    return TritonInstall(binary, backends, source)


def find_tritonserver(binary: str | Path | None = None) -> TritonInstall:
    """Locate ``tritonserver``: explicit path, then a system install, then the nvidia-pytriton wheel."""
    if binary is not None:
        path = Path(binary)
        if not path.is_file():
            raise ServerStartError(f"{path}: no tritonserver binary there")
        wheel = _pytriton_install()
        if wheel is not None and wheel.binary.resolve() == path.resolve():
            return wheel
        return _system_install(path, "explicit")
    found = shutil.which("tritonserver")
    for candidate in ([Path(found)] if found else []) + [p for p in SYSTEM_LOCATIONS if p.is_file()]:
        return _system_install(candidate, "system")
    wheel = _pytriton_install()
    if wheel is None:
        raise ServerStartError(
            "no tritonserver found: not on PATH, not in /opt/tritonserver, and the nvidia-pytriton wheel is not "
            "installed (pip install 'conceptseg-edge[serve]', or use the NGC Triton container)"
        )
    return wheel


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file() or a.stat().st_size != b.stat().st_size:
        return False
    return sha256_file(a) == sha256_file(b)


def _install_file(src: Path, dst: Path, executable: bool = False) -> None:
    if _same_file(src, dst):
        return
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    if executable:
        dst.chmod(0o755)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conceptseg-edge"


def prepare_backends(install: TritonInstall) -> Path:
    """Return a backends directory whose python backend has its stub; copy the stub there if needed."""
    if install.stub is None:
        return install.backends
    python_dir = install.backends / "python"
    if _writable(python_dir):
        _install_file(install.stub, python_dir / STUB_NAME, executable=True)
        return install.backends
    key = hashlib.sha256(f"{install.backends.resolve()}|{sha256_file(install.stub)}".encode()).hexdigest()[:16]
    target = cache_dir() / "triton-backends" / key
    for src in sorted(install.backends.rglob("*")):
        if src.is_file() and "__pycache__" not in src.parts:
            _install_file(src, target / src.relative_to(install.backends), executable=os.access(src, os.X_OK))
    _install_file(install.stub, target / "python" / STUB_NAME, executable=True)
    return target


def server_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``tritonserver`` (and the python stubs it spawns) runs with."""
    env = dict(os.environ if base is None else base)
    lib_dirs: list[str] = []
    if install.source == "pytriton":
        libdir, ldlib = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
        if libdir and ldlib and ldlib.endswith(".so") and (Path(libdir) / ldlib).exists():
            lib_dirs.append(libdir)  # the stub then embeds this interpreter's own libpython
        if install.libs is not None:
            lib_dirs.append(str(install.libs))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    if lib_dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    import site

    sites = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    env["CONCEPTSEG_EDGE_SITE"] = os.pathsep.join(sites)
    return env


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the OS picks it); the server retries if it is taken meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _distinct_ports(n: int, host: str) -> list[int]:
    ports: list[int] = []
    for _ in range(20 * n):
        if len(ports) == n:
            break
        p = free_port(host)
        if p not in ports:
            ports.append(p)
    if len(ports) < n:
        raise ServerStartError(f"could not draw {n} distinct free ports on {host}")
    return ports


def _check_port(port: int | None, flag: str) -> None:
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        raise InputError(f"{flag} {port}: expected a port number 1-65535")


class TritonServer:
    """A ``tritonserver`` process on loopback; a context manager that always stops it.

    Args:
        repository: the model repository.
        http_port, grpc_port, metrics_port: fixed ports, or None for free ones (retried on a clash).
        host: address to bind; loopback unless you mean otherwise.
        binary: an explicit ``tritonserver`` (default: ``find_tritonserver()``).
        log_path: where the server's output goes (default: a temp file, kept on failure; appended to on
            every restart).
        startup_timeout: seconds to wait for readiness (models load and warm up meanwhile).
        gateway_limits: what one HTTP request may declare. ``http_port`` is an ``HttpGateway``
            (``conceptseg_edge.serve.gateway``) relaying to ``tritonserver``'s own HTTP frontend on a
            private loopback port, so a request declaring a huge tensor is refused before Triton allocates it.
    """

    def __init__(
        self,
        repository: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = LOOPBACK,
        binary: str | Path | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 180.0,
        exit_timeout: int = 5,
        extra_args: Sequence[str] = (),
        gateway_limits: GatewayLimits = GatewayLimits(),
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise InputError(f"{repository}: no model repository there")
        for port, flag in ((http_port, "--http-port"), (grpc_port, "--grpc-port"), (metrics_port, "--metrics-port")):
            _check_port(port, flag)
        self._fixed = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.host = host
        self._binary = binary
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.extra_args = tuple(extra_args)
        self.gateway_limits = gateway_limits
        self.install: TritonInstall | None = None
        self.process: subprocess.Popen | None = None
        self.upstream_http_port: int | None = None  # tritonserver's own HTTP frontend, loopback only
        self._gateway: HttpGateway | None = None
        self._backends: Path | None = None
        self._env: dict[str, str] | None = None
        self._log = None

    # ------------------------------------------------------------------ addresses

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    # ------------------------------------------------------------------ lifecycle

    def command(self, backends: Path) -> list[str]:
        assert self.install is not None
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.upstream_http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout}",
            # a private shared-memory prefix: several servers on one host never share regions
            f"--backend-config=python,shm-region-prefix-name=conceptseg_{os.getpid()}_{secrets.token_hex(4)}_",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start the gateway and the server, wait for readiness; free ports are re-drawn (3 tries) on a clash."""
        if self.process is not None or self._gateway is not None:
            raise ServerStartError("server already started")
        self.install = find_tritonserver(self._binary)
        self._backends = prepare_backends(self.install)
        self._env = server_environment(self.install)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="conceptseg-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        attempts = 1 if all(p is not None for p in self._fixed) else 3
        for attempt in range(attempts):
            drawn = iter(_distinct_ports(4, self.host))
            self.http_port, self.grpc_port, self.metrics_port = (p if p is not None else next(drawn) for p in self._fixed)
            self.upstream_http_port = next(drawn)
            _LIVE.add(self)
            try:
                try:
                    self._gateway = HttpGateway((self.host, self.http_port), (LOOPBACK, self.upstream_http_port),
                                                self.gateway_limits).start()
                except OSError as exc:
                    raise ServerStartError(f"--http-port {self.http_port}: cannot listen on {self.host} ({exc.strerror}); "
                                           "already in use?") from exc
                self._launch()
                return self
            except ServerStartError as exc:
                clash = "already in use" in str(exc) or "already in use" in self.log_tail(40).lower()
                self.stop()
                if not clash or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self) -> None:
        """Run ``tritonserver`` on the ports already chosen and wait until it is ready."""
        assert self._backends is not None and self.log_path is not None
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(self._backends), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self._env, start_new_session=True,
        )
        self.wait_ready(self.startup_timeout)

    def restart(self) -> None:
        """Stop ``tritonserver`` (if it still runs) and start it again on the same ports, behind the same gateway.

        The log is appended to, so it keeps what the previous process wrote before it died.
        """
        if self._gateway is None:
            raise ServerStartError("restart: the server was never started")
        self._stop_process()
        try:
            self._launch()
        except ServerStartError:
            self._stop_process()  # never leave a half-started server that "runs" but is not ready
            raise

    def wait_ready(self, timeout: float) -> None:
        """Poll ``/v2/health/ready`` until 200; raise ``ServerStartError`` with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        url = f"{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerStartError(f"tritonserver exited (code {code}) before it was ready; log {self.log_path}:\n{self.log_tail()}")
            if self.is_ready(url):
                return
            time.sleep(0.25)
        raise ServerStartError(f"tritonserver not ready after {timeout:.0f}s; log {self.log_path}:\n{self.log_tail()}")

    @property
    def returncode(self) -> int | None:
        """The exit status of a server that has exited (negative: killed by that signal), else None."""
        return None if self.process is None else self.process.poll()

    def is_ready(self, url: str | None = None) -> bool:
        try:
            with urllib.request.urlopen(url or f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after the grace period, close the gateway; idempotent."""
        _LIVE.discard(self)
        self._stop_process()
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            gateway.stop()

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            try:
                pgid = os.getpgid(process.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
            try:
                process.wait(timeout=self.exit_timeout + 10)
            except subprocess.TimeoutExpired:
                pass
            if pgid is not None:  # the server and any stub left in its group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> dict[str, object]:
        return {
            "binary": str(self.install.binary) if self.install else None,
            "source": self.install.source if self.install else None,
            "repository": str(self.repository),
            "http": self.http_url,
            "http_upstream": f"http://{LOOPBACK}:{self.upstream_http_port}",
            "grpc": self.grpc_url,
            "metrics": f"http://{self.host}:{self.metrics_port}/metrics",
            "log": str(self.log_path),
            "pid": self.process.pid if self.process else None,
        }

    def __enter__(self) -> TritonServer:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_LIVE: set[TritonServer] = set()


@atexit.register
def _stop_all() -> None:  # a server never outlives the interpreter that started it
    for server in list(_LIVE):
        server.stop()


@dataclass(frozen=True)
class RestartPolicy:
    """How ``serve_forever`` brings a crashed ``tritonserver`` back: exponential backoff, reset by a stable run."""

    first_delay: float = 1.0  # seconds before the first restart
    max_delay: float = 60.0
    stable_after: float = 60.0  # a server up this long has its backoff reset

    def delay(self, consecutive: int) -> float:
        """Seconds to wait before restart number ``consecutive`` (1-based) of a crash streak."""
        return min(self.first_delay * 2 ** (consecutive - 1), self.max_delay)


def serve_forever(repository: str | Path, restart: RestartPolicy = RestartPolicy(), **kwargs) -> int:
    """Start, print the endpoints, and supervise until SIGINT/SIGTERM; then stop the server.

    A ``tritonserver`` that exits on its own is restarted on the same ports (the HTTP gateway stays up
    meanwhile) after ``restart.delay(n)`` seconds; every crash and restart is reported on stderr as one
    ``warning:`` line naming the exit status and the log, which keeps every run's output.
    """
    import json

    stop = {"flag": False}  # a plain flag: a signal handler must not take the locks an Event's wait holds

    def _handler(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    def stopped_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not stop["flag"] and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        return stop["flag"]

    def report(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with TritonServer(repository, **kwargs) as server:
            print(json.dumps(server.describe(), indent=2), flush=True)
            streak = 0
            up_since: float | None = time.monotonic()  # None: the last restart failed
            while not stopped_within(0.5):
                if server.running:
                    continue
                code = server.returncode
                what = "is not running" if code is None else f"exited (status {code})"
                stable = up_since is not None and time.monotonic() - up_since >= restart.stable_after
                streak = 1 if stable else streak + 1
                delay = restart.delay(streak)
                report(f"tritonserver {what}; restart {streak} in {delay:g} s; log {server.log_path}")
                if stopped_within(delay):
                    break
                try:
                    server.restart()
                except ServerStartError as exc:
                    report(f"restart {streak} failed: {str(exc).splitlines()[0]}")
                    up_since = None
                    continue
                up_since = time.monotonic()
                report(f"tritonserver restarted (pid {server.process.pid if server.process else None}) and ready; "
                       f"log {server.log_path}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


__all__ = [
    "RestartPolicy",
    "ServerStartError",
    "TritonInstall",
    "TritonServer",
    "find_tritonserver",
    "free_port",
    "prepare_backends",
    "serve_forever",
    "server_environment",
]
