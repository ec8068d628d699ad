"""The Ray side of the CLI fails fast, dies cleanly and starts cleanly.

- an unreachable --address fails in seconds, in one line, exit 2, before any tensor is read;
- Ctrl-C and SIGTERM: one line, exit 130 / 143, staging kept for --resume, no Ray process left;
- a SIGKILLed CLI's embedded cluster is gone within seconds (Ray alone left helpers ~60 s);
- the embedded cluster starts without Ray's auth warning, sized from the usable CPUs, and its
  start-up time is in the report.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from pipeline.runtime import interrupts
from pipeline.runtime import ray_cluster
from pipeline.io.output import open_staged_output
from pipeline.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_TMP = "/tmp/ray"


# -- helpers -----------------------------------------------------------------------------------

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(MERGE_PIPELINE_PROGRESS="0", PYTHONPATH=REPO, **extra)
    return env


def _merge_argv(example, out, *extra: str) -> list[str]:
    base, tuned = example
    return [sys.executable, "-m", "pipeline", "merge", "--base", base, "--finetuned", *tuned,
            "--method", "tsv_m", "--alpha", "1", "--out", str(out), *extra]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _session_dir(proc: subprocess.Popen) -> str | None:
    """Ray names an embedded cluster's session directory after the driver's pid (pids are
    reused: only one made since the process started counts)."""
    found = [path for path in glob.glob(os.path.join(RAY_TMP, f"session_*_{proc.pid}"))
             if os.stat(path).st_mtime >= proc.started - 1]
    return max(found, key=os.path.getmtime) if found else None


def _session_processes(session: str) -> set[int]:
    """Live processes of one Ray session: its path on their command line, or a file of it open
    (workers and agents log into it). Other clusters on this machine, and `tail`, are not
    counted."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
            if command.startswith(b"tail\0"):
                continue
            if session.encode() in command:
                pids.add(int(entry))
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(session + "/"):
                    pids.add(int(entry))
                    break
        except OSError:
            continue
    return {p for p in pids if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(session: str, limit: float) -> float:
    t0 = time.perf_counter()
    while _session_processes(session) and time.perf_counter() - t0 < limit:
        time.sleep(0.1)
    return time.perf_counter() - t0


def _start_cli(argv: list[str], tmp_path) -> subprocess.Popen:
    """The CLI in its own process group, with Ctrl-C's default action (a shell's background
    job, like this test run may be, starts with SIGINT ignored)."""
    started = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=str(tmp_path), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.started = started
    return proc


def _wait_for_staging(proc: subprocess.Popen, parent, limit: float = 90.0) -> str:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        found = glob.glob(os.path.join(str(parent), ".out.merge-staging-*"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the merge ended before it staged anything: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no staging directory appeared")


def _wait_for_a_finished_file(proc: subprocess.Popen, staging: str, limit: float = 90.0):
    from pipeline.io.output import DONE_SUFFIX
    t0 = time.perf_counter()
    while not any(n.endswith(DONE_SUFFIX) for n in _names(staging)):
        if proc.poll() is not None or time.perf_counter() - t0 > limit:
            proc.kill()
            pytest.fail(f"no file was finished: {proc.communicate()}")
        time.sleep(0.02)


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def slow_example(tmp_path_factory):
    """8 tasks at width 320: seconds of merging on one worker, long enough to interrupt."""
    from pipeline.bench.examples import VitShape, write_example
    root = tmp_path_factory.mktemp("slow_example")
    return write_example(str(root), VitShape(width=320, layers=4, patch=16, image=64,
                                             output_dim=128), num_tasks=8)


# -- 1. an unreachable cluster fails fast ------------------------------------------------------

@pytest.fixture(scope="module")
def poisoned_example(tiny_example, tmp_path_factory):
    """The tiny example with a NaN in one fine-tuned tensor: reading the tensors (the input scan)
    would refuse it, so an error about the address shows that no tensor was read first."""
    base, tuned = tiny_example
    poisoned = str(tmp_path_factory.mktemp("poisoned") / "task01")
    os.makedirs(poisoned)
    tensors = load_file(os.path.join(tuned[0], "model.safetensors"))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, os.path.join(poisoned, "model.safetensors"))
    with open(os.path.join(tuned[0], "config.json")) as src, \
            open(os.path.join(poisoned, "config.json"), "w") as dst:
        dst.write(src.read())
    return base, [poisoned, *tuned[1:]]


NO_DISCOVERY = ("import sys, ray._private.services as s; "
                "none = lambda: frozenset(); none.cache_clear = lambda: None; "
                "s.find_gcs_addresses = none; "
                "s.find_bootstrap_address = lambda temp_dir: None; "
                "from pipeline.cli.main import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("address, env, names", [
    ("127.0.0.1:{port}", {}, "127.0.0.1:{port}"),
    (None, {"RAY_ADDRESS": "127.0.0.1:{port}"}, "127.0.0.1:{port} (from RAY_ADDRESS)"),
    ("auto", {}, "--address auto: no running Ray cluster found"),
], ids=["host-port", "RAY_ADDRESS", "auto-none-running"])
def test_an_unreachable_cluster_fails_fast_in_one_line(poisoned_example, tmp_path, address,
                                                       env, names):
    port = str(_closed_port())
    argv = _merge_argv(poisoned_example, tmp_path / "out", "--engine", "ray")
    if address:
        argv += ["--address", address.format(port=port)]
    if not env and address == "auto":  # whatever clusters other tests run here: none is found
        argv[1:3] = ["-c", NO_DISCOVERY]
    t0 = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(tmp_path),
                            env=_env(**{k: v.format(port=port) for k, v in env.items()}))
    elapsed = time.perf_counter() - t0
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert names.format(port=port) in lines[0]
    assert "NaN" not in lines[0]  # no tensor was read before the cluster was checked
    assert ("unset RAY_ADDRESS" if "RAY_ADDRESS" in env else "--address") in lines[0]
    assert elapsed < 20, f"{elapsed:.1f} s (interpreter start-up included)"
    assert os.listdir(tmp_path) == []  # nothing staged, nothing written


def test_connect_refuses_in_seconds_without_starting_ray(monkeypatch):
    import ray
    if ray.is_initialized():
        pytest.skip("this process is connected to Ray already")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    closed = _closed_port()
    for address, env in ((f"ray://127.0.0.1:{closed}", None), ("auto", f"127.0.0.1:{closed}")):
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        with pytest.raises(InputError, match=f"cannot reach the Ray cluster at .*:{closed}"):
            ray_cluster.connect(address)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as listener:  # accepts, never answers: ray.init would retry ~2 min
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        silent = f"127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(InputError, match="does not answer"):
            ray_cluster.connect(silent, probe_timeout_s=1.0)
        assert time.perf_counter() - t0 < 5
    from pipeline.evaluation.pool import EvaluationPool  # the pool starts Ray the same way
    with pytest.raises(InputError, match="connection refused"):
        EvaluationPool("unused", {}, engine="ray", address=f"127.0.0.1:{_closed_port()}")
    with pytest.raises(InputError, match="http:// is the dashboard's"):
        ray_cluster.connect("http://127.0.0.1:8265")
    with pytest.raises(InputError, match="expected HOST:PORT"):
        ray_cluster.connect("headnode")
    assert not ray.is_initialized()


def test_whatever_ray_init_raises_is_one_line():
    class FakeRay:
        def __init__(self, exc):
            self.exc = exc

        def init(self, **kwargs):
            raise self.exc

        def shutdown(self):
            pass

    for exc in (RuntimeError("GCS said no\n  at line 1\n  at line 2"), SystemExit(15),
                ConnectionError("Could not find any running Ray instance.")):
        with pytest.raises(InputError) as info:
            ray_cluster._init(FakeRay(exc), "cannot join the Ray cluster at h:1", "do this")
        assert "\n" not in str(info.value) and str(info.value).endswith("; do this")
    with pytest.raises(KeyboardInterrupt):  # an interrupt stays an interrupt
        ray_cluster._init(FakeRay(KeyboardInterrupt()), "x", "y")


# -- 2. interrupted runs ----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("engine, signum", [("ray", signal.SIGINT), ("ray", signal.SIGTERM),
                                            ("local", signal.SIGINT)],
                         ids=["ray-ctrl-c", "ray-sigterm", "local-ctrl-c"])
def test_an_interrupted_merge_says_one_line_keeps_its_work_and_leaves_no_ray(
        slow_example, tmp_path, engine, signum):
    argv = _merge_argv(slow_example, tmp_path / "out", "--engine", engine, "--workers", "1")
    proc = _start_cli(argv, tmp_path)
    staging = _wait_for_staging(proc, tmp_path)
    _wait_for_a_finished_file(proc, staging)  # before it, there is nothing to keep
    session = _session_dir(proc)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole process group
    else:
        proc.send_signal(signum)  # `kill PID`
    t0 = time.perf_counter()
    out, err = proc.communicate(timeout=60)
    print(f"{engine} {signal.Signals(signum).name}: exited {time.perf_counter() - t0:.1f} s "
          f"after the signal")
    assert proc.returncode == 128 + signum, err[-3000:]
    lines = _lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert staging in lines[0] and "run the same command with --resume" in lines[0]
    assert ("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C") in lines[0]
    assert os.path.isdir(staging) and not os.path.exists(tmp_path / "out")
    if engine == "ray":
        assert session is not None, "no Ray session named after the CLI's pid"
        left = _session_processes(session)
        assert not left, f"Ray processes left behind: {left}"
    if signum == signal.SIGINT and engine == "ray":  # and the same command carries on
        result = subprocess.run(argv + ["--resume"], capture_output=True, text=True,
                                timeout=120, env=_env(), cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Token authentication" not in result.stderr and "WARNING" not in result.stderr
        report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
        assert report["engine"]["embedded_cluster"] is True
        assert not glob.glob(os.path.join(str(tmp_path), ".out.merge-staging-*"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_ray_starts_leaves_nothing_behind(tiny_example, tmp_path, signum):
    """Before the reaper knows the session and while ray.init has its own SIGTERM handler."""
    proc = _start_cli(_merge_argv(tiny_example, tmp_path / "out", "--engine", "ray"), tmp_path)
    t0 = time.perf_counter()
    while _session_dir(proc) is None and proc.poll() is None \
            and time.perf_counter() - t0 < 60:
        time.sleep(0.02)
    session = _session_dir(proc)
    assert session, f"Ray never started: {proc.poll()} {proc.communicate() if proc.poll() is not None else ''}"
    os.killpg(proc.pid, signum) if signum == signal.SIGINT else proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-3000:]
    lines = _lines(err)
    assert len(lines) == 1 and "run the same command with --resume" in lines[0], err[-3000:]
    assert not _session_processes(session)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_a_killed_cli_leaves_no_ray_process_for_long(slow_example, tmp_path):
    """SIGKILL runs no cleanup: the reaper tied to the CLI by a pipe sweeps the cluster."""
    proc = _start_cli(_merge_argv(slow_example, tmp_path / "out", "--engine", "ray",
                                  "--workers", "1"), tmp_path)
    _wait_for_staging(proc, tmp_path)  # the cluster is up and its workers have run tasks
    session = _session_dir(proc)
    assert session and _session_processes(session)
    reader = subprocess.Popen(["tail", "-f", os.path.join(session, "logs", "raylet.out")],
                              stdout=subprocess.DEVNULL)  # someone reading its logs
    time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=30)
    gone_after = _wait_gone(session, limit=30)
    print(f"Ray processes of a SIGKILLed CLI gone after {gone_after:.1f} s")
    assert reader.poll() is None, "the reaper killed a process that only reads the logs"
    reader.kill()
    reader.wait()
    assert not _session_processes(session)
    assert gone_after < 5


# -- 3-5. a clean start, sized from the usable CPUs, timed --------------------------------------

@pytest.mark.slow
def test_the_embedded_cluster_starts_clean_sized_and_timed(tiny_example, tmp_path):
    """Pinned to one CPU (as a container's affinity or quota would), on a machine with more."""
    one_cpu = {min(os.sched_getaffinity(0))}
    result = subprocess.run(_merge_argv(tiny_example, tmp_path / "out", "--engine", "ray"),
                            capture_output=True, text=True, timeout=120, env=_env(),
                            cwd=str(tmp_path), preexec_fn=lambda: os.sched_setaffinity(0, one_cpu))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == "", result.stderr[-3000:]  # no auth warning, no noise
    engine = json.loads((tmp_path / "out" / "merge_report.json").read_text())["engine"]
    print(f"embedded cluster start-up (on one CPU): {engine['startup_s']:.2f} s")
    assert engine["embedded_cluster"] is True and 0 < engine["startup_s"] < 60
    assert engine["workers"] == 1 and "1 worker(s)" in result.stdout


def _cgroup(tmp_path, proc_line: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_line)
    return str(root), str(proc)


def test_cpus_come_from_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    # cgroup v2: the tightest quota on the way up wins, rounded down
    root, proc = _cgroup(tmp_path / "v2", "0::/job/step\n", {
        "cpu.max": "max 100000\n", "job/cpu.max": "250000 100000\n",
        "job/step/cpu.max": "max 100000\n"})
    assert ray_cluster.cgroup_cpu_quota(root, proc) == 2.5
    assert ray_cluster.usable_cpus(root, proc) == 2
    root, proc = _cgroup(tmp_path / "v2-small", "0::/\n", {"cpu.max": "50000 100000\n"})
    assert ray_cluster.usable_cpus(root, proc) == 1  # half a CPU still runs one worker
    root, proc = _cgroup(tmp_path / "v2-none", "0::/\n", {"cpu.max": "max 100000\n"})
    assert ray_cluster.usable_cpus(root, proc) == 8  # no quota: the affinity mask
    # cgroup v1
    root, proc = _cgroup(tmp_path / "v1", "4:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert ray_cluster.usable_cpus(root, proc) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert ray_cluster.usable_cpus(root, proc) == 2  # affinity tighter than the quota


# -- the pieces behind the one line --------------------------------------------------------------

def test_sigterm_unwinds_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with interrupts.signals_unwind() as received:
        with pytest.raises(interrupts.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one, while cleaning up: ignored
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert received.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    assert interrupts.exit_code(received.of(KeyboardInterrupt())) == 143
    assert interrupts.exit_code(interrupts.Received().of(KeyboardInterrupt())) == 130


def test_staged_output_leaves_the_telling_to_main(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt) as info:
        with open_staged_output(str(tmp_path / "out"), run_key="k") as out:
            out.write_text("finished.txt", "done")
            raise KeyboardInterrupt
    assert info.value.staging_dir == out.path and os.path.isdir(out.path)
    assert capsys.readouterr().err == ""
    line = interrupts.describe(signal.SIGINT, info.value, resumable=True)
    assert out.path in line and "--resume" in line and "\n" not in line


def test_an_interrupt_before_any_finished_file_keeps_no_staging(tmp_path):
    """Nothing finished, nothing to resume: no empty staging directory is left, and the line
    says no output file was written instead of pointing at one."""
    with pytest.raises(KeyboardInterrupt) as info:
        with open_staged_output(str(tmp_path / "out"), run_key="k") as out:
            os.makedirs(out.path, exist_ok=True)
            raise KeyboardInterrupt
    assert not os.path.exists(out.path) and not os.path.exists(tmp_path / "out")
    assert getattr(info.value, "staging_dir", None) is None
    line = interrupts.describe(signal.SIGINT, info.value, resumable=True)
    assert "before any output file was written" in line


def test_startup_seconds_are_in_the_executor_info():
    from pipeline.runtime.executors import LocalExecutor
    assert LocalExecutor("cpu").info()["startup_s"] == 0.0


@pytest.mark.slow
def test_joining_a_token_cluster_needs_the_token_and_says_so_fast(ray_cluster, tiny_example,
                                                                  tmp_path):
    """The session's cluster (Ray's default: token auth) joined by address, as a user would."""
    gcs = ray_cluster._private.worker._global_node.gcs_address
    argv = _merge_argv(tiny_example, tmp_path / "out", "--engine", "ray", "--address", gcs)
    t0 = time.perf_counter()
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(),
                             cwd=str(tmp_path))
    elapsed = time.perf_counter() - t0
    assert refused.returncode == 2 and len(_lines(refused.stderr)) == 1, refused.stderr[-3000:]
    assert "requires token authentication: set RAY_AUTH_MODE=token" in refused.stderr
    assert elapsed < 20, f"{elapsed:.1f} s"  # ray.init alone retried for 20 s, then failed
    joined = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env=_env(RAY_AUTH_MODE="token"), cwd=str(tmp_path))
    assert joined.returncode == 0, joined.stderr[-3000:]
    engine = json.loads((tmp_path / "out" / "merge_report.json").read_text())["engine"]
    assert engine["embedded_cluster"] is False and engine["workers"] == 3
    print(f"joined an existing cluster in {engine['startup_s']:.2f} s")


# -- 6. a fast teardown that leaves nothing behind ----------------------------------------------

@pytest.mark.slow
def test_a_finished_merge_leaves_no_ray_process_when_the_cli_exits(tiny_example, tmp_path):
    """The embedded cluster is SIGKILLed at once after the commit (no graceful waits) and the
    CLI skips Python's finalization: by the time the process has exited, no process of its
    session is alive, the output is whole, and stderr holds nothing but the phase stamps."""
    proc = _start_cli(_merge_argv(tiny_example, tmp_path / "out", "--engine", "ray"), tmp_path)
    out, err = proc.communicate(timeout=180)
    session = _session_dir(proc)
    left = _session_processes(session) if session else set()
    assert proc.returncode == 0, err[-3000:]
    assert session is not None, "no Ray session named after the CLI's pid"
    assert not left, f"Ray processes alive after the CLI exited: {left}"
    assert err.strip() == "", err[-3000:]
    assert out.startswith("tsv_m: ")
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["engine"]["embedded_cluster"] is True
    assert report["engine"].get("worker_import_s", 0) > 0  # every worker was warmed up


@pytest.mark.slow
def test_the_cli_stamps_its_phases_on_request(tiny_example, tmp_path):
    """MERGE_PIPELINE_PHASES=1 (benchmarks/fixed_costs_bench.py): one stamp per phase, in
    order, on the monotonic clock this process reads too (how long each takes is the
    benchmark's business, not a test's)."""
    before = time.monotonic()
    result = subprocess.run(_merge_argv(tiny_example, tmp_path / "out", "--engine", "ray"),
                            capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                            env=_env(MERGE_PIPELINE_PHASES="1"))
    after = time.monotonic()
    assert result.returncode == 0, result.stderr[-3000:]
    stamps = [line.split() for line in _lines(result.stderr)]
    assert [s[:3] for s in stamps] == [["merge-pipeline", "phase", p]
                                      for p in ("main", "command", "shutdown")], result.stderr
    times = [float(s[3]) for s in stamps]
    assert before < times[0] <= times[1] <= times[2] < after
    print(f"shutdown {times[2] - times[1]:.2f} s, exit {after - times[2]:.2f} s")
