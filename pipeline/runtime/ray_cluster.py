"""The one place that starts or joins Ray: `connect(address) -> ClusterInfo`.

Used by the merge executor and the evaluation pool. It

- fails fast on a cluster that is not there: the address is resolved the way Ray would
  (`auto`, RAY_ADDRESS) and probed with a short timeout before `ray.init`, which would
  otherwise retry for minutes (a TCP connection, an HTTP/2 handshake, then one GCS call through
  Ray's own channel, which also tells a missing token); anything `ray.init` raises becomes a
  one-line `InputError`;
- sizes an embedded cluster from the CPUs this process may use (affinity, cgroup quota), not
  the machine's CPU count;
- makes the embedded cluster's authentication explicit (see `_explicit_token_auth`);
- ties the embedded cluster's helper processes to this process (see `_REAPER`), so none
  outlives it by more than a moment, even when it is SIGKILLed;
- measures the start-up, for the report.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import InputError
from pipeline.runtime import interrupts

PROBE_TIMEOUT_S = 3.0
KILL_REAP_S = 2.0  # how long a fast teardown waits for the killed processes to be reaped
EMBEDDED_HINT = "or leave out --address to run on an embedded local cluster"


@dataclass
class ClusterInfo:
    """The Ray cluster this process is connected to."""

    address: str | None  # what we joined; None for an embedded cluster (or one found connected)
    started: bool  # this object started the cluster and shuts it down (`shutdown_if_started`)
    startup_s: float  # seconds this call spent probing, starting or joining (0: connected)
    embedded: bool = False  # an embedded cluster of this process (started now or before)
    num_cpus: int | None = None  # CPUs given to an embedded cluster
    session_dir: str | None = None
    _reaper: subprocess.Popen | None = field(default=None, repr=False)

    def shutdown_if_started(self) -> None:
        """Shut the cluster down if this process started it; a joined cluster is left alone.
        Then the reaper sweeps whatever ray.shutdown left of it."""
        global _STARTED
        if not self.started:
            return
        self.started = False
        if _STARTED is self:
            _STARTED = None
        try:
            if self.is_current():  # not if someone shut it down and started another since
                import ray
                if self._reaper is not None and self._reaper.poll() is None:
                    _kill_at_once()  # the reaper sweeps the rest: no graceful waits
                ray.shutdown()
        except Exception:  # noqa: S110 - the reaper below kills what is left
            pass
        finally:
            _stop_reaper(self._reaper)
            self._reaper = None

    def is_current(self) -> bool:
        """Whether this process is still connected to this (embedded) cluster."""
        import ray
        return ray.is_initialized() and _session_dir() == self.session_dir


_STARTED: ClusterInfo | None = None  # the embedded cluster this process started, if any


def shutdown_started() -> None:
    """Shut down the embedded cluster this process started, if any (idempotent)."""
    if _STARTED is not None:
        _STARTED.shutdown_if_started()


def connect(address: str | None = None, num_cpus: int | None = None,
            probe_timeout_s: float = PROBE_TIMEOUT_S) -> ClusterInfo:
    """Join the cluster at `address` (host:port, ray://host:port, auto), or start an embedded
    one when `address` is None and RAY_ADDRESS is unset. Reuses an existing connection."""
    import ray
    if _STARTED is not None and not _STARTED.is_current():
        _STARTED.shutdown_if_started()  # shut down by someone else: let its reaper sweep
    if ray.is_initialized():  # already connected: nothing to start, nothing to time
        return ClusterInfo(address=None if _STARTED else address, started=False, startup_s=0.0,
                           embedded=_STARTED is not None,
                           num_cpus=_STARTED.num_cpus if _STARTED else None,
                           session_dir=_STARTED.session_dir if _STARTED else None)
    t0 = time.perf_counter()
    target, origin = _resolve(address)
    if target is None:
        return _start_embedded(num_cpus, t0)
    host, port = _host_port(target, origin)
    _probe(host, port, origin, probe_timeout_s)
    if host and not target.startswith("ray://"):
        _ask_gcs(host, port, origin, probe_timeout_s)
    kwargs: dict[str, Any] = {}
    if not target.startswith("ray://"):  # a Ray client would forward these to the server
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING,
                      configure_logging=True)
    auth = "" if os.environ.get("RAY_AUTH_MODE") else (
        "; if it uses token authentication (Ray's default), set RAY_AUTH_MODE=token and its "
        "token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)")
    _init(ray, f"cannot join the Ray cluster at {origin}",
          f"check the address and that the cluster runs the same Ray version "
          f"({ray.__version__}){auth}, {_embedded_hint(origin)}", address=target, **kwargs)
    return ClusterInfo(address=target, started=False, startup_s=time.perf_counter() - t0)


# -- where to connect --------------------------------------------------------------------------

def _resolve(address: str | None) -> tuple[str | None, str]:
    """(address to pass to ray.init or None for an embedded cluster, how the user named it)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if address is None or address == "auto":
        if env and env not in ("auto", "local"):
            return env, f"{env} (from RAY_ADDRESS)"
        if address is None and env != "auto":
            return None, "embedded"
        found = _find_local_cluster()
        if found is None:
            raise InputError("--address auto: no running Ray cluster found on this machine "
                             "(RAY_ADDRESS is not set and no `ray start` cluster is running); "
                             "start one with `ray start --head`, pass --address HOST:PORT, "
                             f"{EMBEDDED_HINT}")
        return found, f"{found} (found by --address auto)"
    if address == "local":
        return None, "embedded"
    return address, address


def _embedded_hint(origin: str) -> str:
    return ("or unset RAY_ADDRESS to run on an embedded local cluster" if "RAY_ADDRESS" in origin
            else EMBEDDED_HINT)


def _find_local_cluster() -> str | None:
    """The cluster `ray.init(address="auto")` would join: the last `ray start` on this machine,
    or any running GCS. None when there is none."""
    try:
        from ray._private import services
        found = services.find_bootstrap_address(None)
        if found is None:
            addresses = sorted(services.find_gcs_addresses())
            found = addresses[0] if addresses else None
        return found
    except Exception:  # Ray moved its helpers: let ray.init look, and convert what it raises
        return "auto"


def _host_port(target: str, origin: str) -> tuple[str, int]:
    rest = target
    if "://" in rest:
        scheme, rest = rest.split("://", 1)
        if scheme != "ray":
            raise InputError(f"Ray address {origin}: {scheme}:// is not a Ray cluster address "
                             f"(http:// is the dashboard's, for `ray job submit`); use "
                             f"HOST:PORT (the GCS, port 6379 by default) or ray://HOST:PORT "
                             f"(Ray client, port 10001), {_embedded_hint(origin)}")
    rest = rest.rstrip("/")
    if rest == "auto":
        return "", 0  # Ray's own discovery could not be consulted; nothing to probe
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"Ray address {origin}: expected HOST:PORT or ray://HOST:PORT, "
                         f"{_embedded_hint(origin)}")
    return host, int(port)


def _probe(host: str, port: int, origin: str, timeout: float) -> None:
    """Refuse, within `timeout`, an address where nothing listens or where something other than
    a gRPC server (the GCS, a Ray client server) answers: ray.init would retry for minutes."""
    if not host:
        return
    hint = f"check the address and that the cluster is up (`ray status` on its head), " \
        f"{_embedded_hint(origin)}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS handshake comes first: the TCP connection is all we check
            sock.settimeout(timeout)
            sock.sendall(_HTTP2_PREFACE)
            answer = b""
            while len(answer) < 9:  # a frame header
                chunk = sock.recv(16)
                if not chunk:
                    break
                answer += chunk
    except TimeoutError:
        raise InputError(f"the Ray cluster at {origin} does not answer (no reply within "
                         f"{timeout:g} s); {hint}") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise InputError(f"cannot reach the Ray cluster at {origin} ({reason.lower()}); "
                         f"{hint}") from None
    if answer.startswith(b"HTTP/"):
        raise InputError(f"{origin} is an HTTP server (the dashboard's port, perhaps), not a "
                         f"Ray cluster address; use the GCS port (6379 by default) or "
                         f"ray://HOST:10001, {_embedded_hint(origin)}")
    if len(answer) < 9 or answer[3] != 0x04:  # an HTTP/2 server opens with a SETTINGS frame
        raise InputError(f"{origin} does not answer like a Ray cluster (no gRPC handshake); "
                         f"{hint}")


def _ask_gcs(host: str, port: int, origin: str, timeout: float) -> None:
    """One real RPC to the GCS, the first one ray.init makes, through Ray's own channel (with
    the token and TLS ray.init would use): tells a missing or wrong token, or a gRPC server that
    is no GCS (a proxy), within `timeout`, where ray.init would retry for 20 s or more."""
    try:
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except Exception:  # Ray moved them: the probe above is all we check
        return
    channel = init_grpc_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        messages: Any = gcs_service_pb2  # generated code: untyped
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            messages.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        details = " ".join(str(err.details() if callable(getattr(err, "details", None))
                               else err).split())[:160]
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if (os.environ.get("RAY_AUTH_MODE") or "").lower() == "token":
                raise InputError(f"the Ray cluster at {origin} refused this machine's token "
                                 f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token): "
                                 f"use the cluster's token, {_embedded_hint(origin)}") from None
            raise InputError(f"the Ray cluster at {origin} requires token authentication: set "
                             f"RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or "
                             f"~/.ray/auth_token), {_embedded_hint(origin)}") from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise InputError(f"the Ray cluster at {origin} does not answer (no reply within "
                             f"{timeout:g} s); check the address and that the cluster is up, "
                             f"{_embedded_hint(origin)}") from None
        raise InputError(f"{origin} does not answer like a Ray cluster ({details or code}); "
                         f"check the address (the GCS port, 6379 by default), "
                         f"{_embedded_hint(origin)}") from None
    finally:
        channel.close()


# The HTTP/2 client connection preface, then an empty SETTINGS frame: a gRPC server answers
# with its own SETTINGS frame (type 0x04) before any authentication.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


# -- the embedded cluster ----------------------------------------------------------------------

def _start_embedded(num_cpus: int | None, t0: float) -> ClusterInfo:
    global _STARTED
    import ray
    num_cpus = num_cpus or usable_cpus()
    _explicit_token_auth()
    reaper = _start_reaper()  # first: it also sweeps a start-up that was interrupted
    try:
        _init(ray, "could not start an embedded Ray cluster",
              "see the logs under /tmp/ray/session_latest/logs", num_cpus=num_cpus,
              include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    except BaseException:
        _stop_reaper(reaper)
        raise
    info = ClusterInfo(address=None, started=True, startup_s=0.0, embedded=True,
                       num_cpus=num_cpus, session_dir=_session_dir(), _reaper=reaper)
    _STARTED = info
    _announce(reaper, info.session_dir, _raylet_pid())
    info.startup_s = time.perf_counter() - t0
    return info


def _explicit_token_auth() -> None:
    """Choose the embedded cluster's authentication explicitly: token authentication.

    Ray 2.60 turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset,
    and warns about it on every start. We keep it on and say so, and the warning goes:
    the embedded cluster is *not* loopback-only. Ray advertises the node's routable IP and its
    GCS, raylet and workers listen on all interfaces (measured with `ss -ltn`), and whoever
    reaches those ports can run arbitrary code as this user; binding to loopback is possible
    only through Ray-private switches, and even loopback is open to every local user.
    Disabling auth would therefore expose this user's account to the network for the length
    of a merge. The token is Ray's usual one (~/.ray/auth_token, or RAY_AUTH_TOKEN[_PATH]);
    when none exists yet we create it readable by this user only (Ray's own would follow the
    umask, typically world-readable). A RAY_AUTH_MODE set by the user is respected as is.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:  # sets RAY_AUTH_MODE=token for us and our children, and refreshes Ray's config
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray version: keep its default (token auth, with a warning)
        return
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _create_private_token(os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))
    _enable_token_auth()


def _create_private_token(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # exists already (Ray's, or another run's), or no home: Ray handles it
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray generates: 256 random bits


def _init(ray, what: str, hint: str, **kwargs: Any) -> None:
    """ray.init, with every failure as one line, and Ctrl-C / SIGTERM still ending the run
    through `interrupts`: while it starts, ray.init replaces the SIGTERM handler with its own
    `sys.exit`, then its core worker installs a crash reporter for SIGTERM at the C level; we
    keep ours in place and give it back afterwards. A signal whose exception was swallowed
    (Ray forks its daemons, and exceptions in fork callbacks are only printed) is raised again
    once ray.init returns."""
    main_thread = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} \
        if main_thread else {}
    keep_ours = interrupts.active() and callable(saved.get(signal.SIGTERM))
    utils: Any = getattr(getattr(ray, "_private", None), "utils", None)
    ray_sets_sigterm = getattr(utils, "set_sigterm_handler", None)
    if keep_ours and ray_sets_sigterm is not None:
        utils.set_sigterm_handler = lambda handler: None  # ours unwinds: same end, cleaner
    try:
        ray.init(**kwargs)
        interrupts.reraise_if_interrupted()
    except (Exception, SystemExit) as exc:
        _quiet_shutdown(ray)
        interrupts.reraise_if_interrupted(exc)  # a signal that Ray turned into an exception
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(f"{what}: {detail}; {hint}") from None
    except BaseException:  # interrupted while starting: leave nothing half-started behind
        _quiet_shutdown(ray)
        raise
    finally:
        if keep_ours and ray_sets_sigterm is not None:
            utils.set_sigterm_handler = ray_sets_sigterm
        for signum, handler in saved.items():
            if callable(handler):
                signal.signal(signum, handler)


def _kill_at_once() -> None:
    """Make the coming `ray.shutdown` SIGKILL the cluster's own processes all at once.

    Ray's teardown sends SIGTERM to the raylet, the GCS and each helper in turn and gives each
    up to a second to exit: 1.1-1.7 s measured for an embedded cluster on 2 cores, on every
    run. Nothing of an embedded cluster is worth a graceful exit (its state lives in memory
    and dies with it), and the reaper, which is only asked once ray.shutdown has returned,
    SIGKILLs the workers and agents that the raylet would have stopped. The driver still
    disconnects first (ray.shutdown does that before it kills anything). Only for a node this
    process started (joined clusters are never killed); with Ray's internals moved, Ray's own
    teardown runs."""
    try:
        from ray._private import worker
        node: Any = worker._global_node
        processes = node.all_processes
    except Exception:
        return
    if not isinstance(processes, dict):
        return

    def kill_all_processes(*_: Any, **__: Any) -> None:
        running = [info.process for infos in processes.values() for info in infos]
        for process in running:
            with contextlib.suppress(OSError):
                process.kill()
        deadline = time.monotonic() + KILL_REAP_S
        for process in running:  # reap them; one stuck in the kernel is not waited for long
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        processes.clear()

    node.kill_all_processes = kill_all_processes


def _quiet_shutdown(ray) -> None:
    with contextlib.suppress(BaseException):  # best effort; the reaper sweeps what is left
        ray.shutdown()


# -- CPUs this process may use ----------------------------------------------------------------

def usable_cpus(cgroup_root: str = "/sys/fs/cgroup",
                proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota
    (rounded down: a worker is one busy CPU), at least 1. `os.cpu_count()` counts the host's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota + 1e-9)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: str = "/sys/fs/cgroup",
                     proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of quota granted to this process's cgroup (the tightest of it and its
    ancestors; cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us`), None when unlimited/unknown."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            for directory in _ancestors(cgroup_root, path):
                limits.append(_read_cpu_max(os.path.join(directory, "cpu.max")))
        elif "cpu" in controllers.split(","):  # cgroup v1
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                base = os.path.join(cgroup_root, mount)
                if os.path.isdir(base):
                    for directory in _ancestors(base, path):
                        limits.append(_read_cfs(directory))
                    break
    known = [q for q in limits if q is not None]
    return min(known) if known else None


def _ancestors(root: str, path: str) -> list[str]:
    """`root`/`path` and each of its parents up to `root` (a cgroup namespace's root shows
    as "/"; a directory that is not mounted here is skipped by the readers)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [os.path.join(root, *parts[:i]) for i in range(len(parts), -1, -1)]


def _read_cpu_max(path: str) -> float | None:
    try:
        with open(path) as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or 100000)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_cfs(directory: str) -> float | None:
    try:
        with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
            quota = int(f.read().strip())
        with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
            period = int(f.read().strip())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


# -- fate-sharing: no helper outlives this process ----------------------------------------------

# Ray kills its GCS and raylet with this process (PR_SET_PDEATHSIG), but the processes the
# raylet starts (workers, the dashboard and runtime-env agents) only notice the raylet's death,
# then block for up to a minute trying to report it to the dead GCS: after a SIGKILL of the CLI
# they were measured lingering 4-62 s. So a reaper process, started before `ray.init`, holds the
# read end of a pipe whose write end only this process has. At EOF (this process exited, however
# it died, or shut the cluster down) it SIGKILLs what is left of the cluster, and nothing else
# (see `_sweep`). This process tells it the session once Ray has started; if Ray never got that
# far (interrupted during start-up), it sweeps the sessions named after this process's pid that
# began after the reaper did. It runs in its own session, so a Ctrl-C sent to the terminal's
# process group does not reach it.

def _reaper_main() -> None:
    """The reaper process: `python -I -S -c ...` (stdlib and this module only, ~0.1 s)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    package, temp_root = sys.argv[1:3]
    parent, began = os.getppid(), time.time()
    announced, buffer = [], b""
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        *lines, buffer = (buffer + chunk).split(b"\n")
        announced += [line.decode().split(" ") for line in lines if line]
    if announced:
        sessions = [session for session, _ in announced]
        raylets = {raylet for _, raylet in announced if raylet}
    else:
        sessions, raylets = _sessions_of(parent, temp_root, since=began - 2), set()
    _sweep(sessions, raylets, package, spare={os.getpid(), parent})


def _sessions_of(pid: int, temp_root: str, since: float) -> list[str]:
    """Ray names a session `session_<local date-time>_<driver pid>`: the driver's since `since`."""
    found = []
    try:
        names = os.listdir(temp_root)
    except OSError:
        return []
    for name in names:
        prefix, _, owner = name.rpartition("_")
        if not name.startswith("session_") or owner != str(pid):
            continue
        try:
            began = datetime.datetime.strptime(prefix[len("session_"):],
                                               "%Y-%m-%d_%H-%M-%S_%f").timestamp()
        except ValueError:
            continue
        if began >= since:
            found.append(os.path.join(temp_root, name))
    return found


def _sweep(sessions: list[str], raylets: set[str], package: str, spare: set[int]) -> list[int]:
    """SIGKILL the processes of these Ray sessions: Ray's programs (under `package`) naming a
    session on their command line; "ray::..." processes (workers and agents: retitled, which
    may overwrite their environment block too) with a file of a session open (they log
    there); processes whose environment names one of `raylets`. Not a `tail -f` of the logs."""
    marks = [m for s in sessions for m in (s.encode() + b"/", s.encode() + b"\0")]
    prefixes = tuple(s.rstrip("/") + "/" for s in sessions)
    raylet_vars = [b"\0RAY_RAYLET_PID=" + r.encode() + b"\0" for r in raylets]
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spare:
            continue
        command = _read(f"/proc/{entry}/cmdline")
        ours = any(arg.startswith(package.encode()) for arg in command.split(b"\0")[:3]) \
            and any(mark in command for mark in marks)
        if not ours and raylet_vars:
            environ = b"\0" + _read(f"/proc/{entry}/environ")
            ours = any(var in environ for var in raylet_vars)
        if not ours and command.startswith(b"ray::") and prefixes:
            ours = any(link.startswith(prefixes) for link in _open_files(entry))
        if ours:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except OSError:
                pass
    return killed


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _open_files(pid: str) -> list[str]:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    links = []
    for fd in fds:
        with contextlib.suppress(OSError):
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def _session_dir() -> str | None:
    """The session directory of the cluster this process is connected to (Ray-private)."""
    try:
        from ray._private import worker
        node: Any = worker._global_node
        return node.get_session_dir_path()
    except Exception:
        return None


def _raylet_pid() -> int | None:
    """The embedded cluster's raylet's pid (Ray-private; None if Ray moved it)."""
    try:
        from ray._private import ray_constants, worker
        node: Any = worker._global_node
        processes = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
        return int(processes[0].process.pid)
    except Exception:
        return None


def _ray_temp_root() -> str:
    try:
        from ray._common.utils import get_default_ray_temp_dir
        return get_default_ray_temp_dir()
    except Exception:
        return os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray")


_REAPER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
           "from pipeline.runtime.ray_cluster import _reaper_main; _reaper_main()")


def _start_reaper() -> subprocess.Popen | None:
    import ray
    if not sys.platform.startswith("linux"):
        return None
    import pipeline
    root = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))  # imports it
    package = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep
    try:
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, root, package,
                                 _ray_temp_root()], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    except OSError:
        return None


def _announce(reaper: subprocess.Popen | None, session: str | None, raylet: int | None) -> None:
    if reaper is None or reaper.stdin is None or not session:
        return
    try:
        reaper.stdin.write(f"{session} {raylet or ''}\n".encode())
        reaper.stdin.flush()
    except OSError:
        pass


def _stop_reaper(reaper: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Let the reaper sweep what ray.shutdown left, and wait for it."""
    if reaper is None or reaper.stdin is None:
        return
    try:
        reaper.stdin.close()
        reaper.wait(timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        pass
