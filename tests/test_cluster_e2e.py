"""End to end as users run it: a real Ray head on loopback (cluster/local-head.sh, token
authentication), `ray job submit` of ray_jobs/nightly.py with the tiny suite, then the history
and the report it left. The head is stopped by its own command, and only that head."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipeline.history.store import MEAN, read_history

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "cluster", "local-head.sh")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env_file(path: str) -> dict[str, str]:
    values = {}
    for line in open(path, encoding="utf-8"):
        name, _, value = line.strip().removeprefix("export ").partition("=")
        values[name] = value
    return values


@pytest.fixture
def local_head():
    """The head's settings for a client, with ports and state of its own."""
    # Short path: Ray's socket paths under the temp dir must stay under ~100 characters.
    state = tempfile.mkdtemp(prefix="mp-ray-", dir="/tmp")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_LOCAL_STATE=state, RAY_LOCAL_PORT=str(free_port()),
                RAY_LOCAL_DASHBOARD_PORT=str(free_port()),
                RAY_LOCAL_CLIENT_PORT=str(free_port()), RAY_LOCAL_CPUS="2", RAY=RAY,
                MERGE_PIPELINE_PROGRESS="0")
    started = subprocess.run(["bash", SCRIPT, "start"], env=base, capture_output=True,
                             text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        client = {**base, **read_env_file(os.path.join(state, "env"))}
        yield base, client
    finally:
        stopped = subprocess.run(["bash", SCRIPT, "stop"], env=base, capture_output=True,
                                 text=True, timeout=120)
        status = subprocess.run(["bash", SCRIPT, "status"], env=base, capture_output=True,
                                text=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr
        assert status.stdout.strip() == "stopped"


@pytest.mark.slow
def test_nightly_job_through_the_jobs_api(local_head, tiny_suite, tmp_path):
    base, client = local_head
    assert client["RAY_AUTH_MODE"] == "token"
    assert oct(os.stat(client["RAY_AUTH_TOKEN_PATH"]).st_mode & 0o777) == "0o600"

    # Token authentication is really on: a client without the token is refused.
    no_token = {**base, "RAY_ADDRESS": client["RAY_ADDRESS"], "RAY_AUTH_MODE": "token",
                "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run([RAY, "job", "list"], env=no_token, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()

    history, report, work = (str(tmp_path / n) for n in ("history", "report.html", "work"))
    runtime_env = {"env_vars": {"MERGE_PIPELINE_GIT_COMMIT": "0123abcd" * 5,
                                "MERGE_PIPELINE_PROGRESS": "0"}}
    # The head's job agent can register well after the Jobs API answers (tens of seconds on a
    # loaded machine): retry that one refusal for up to two minutes.
    deadline = time.monotonic() + 120
    while True:
        submit = subprocess.run(
            [RAY, "job", "submit", "--working-dir", REPO, "--runtime-env-json",
             json.dumps(runtime_env), "--", sys.executable, "ray_jobs/nightly.py",
             "--config", "cluster/nightly.yaml", "--suites", tiny_suite[0], "--tasks", "2",
             "--methods", "task_arithmetic,iso_cts", "--workers", "1", "--history", history,
             "--report", report, "--work-dir", work, "--cache", tiny_suite[1]],
            env=client, cwd=REPO, capture_output=True, text=True, timeout=900)
        log = submit.stdout + submit.stderr
        if "No available agent to submit job" not in log or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert submit.returncode == 0, log[-4000:]
    assert "succeeded" in log

    rows = read_history(history).to_pylist()
    (run_id,) = {r["run_id"] for r in rows}
    assert {r["git_commit"] for r in rows} == {"0123abcd" * 5}
    means = {r["method"]: r for r in rows if r["task"] == MEAN}
    assert set(means) == {"zero_shot", "finetuned", "task_arithmetic", "iso_cts"}
    assert all(r["num_tasks"] == 2 and r["kind"] == "bench" for r in rows)
    assert means["iso_cts"]["params"] == json.dumps({"common_space_fraction": 0.8})
    page = open(report, encoding="utf-8").read()
    assert run_id in page and page.count("data:image/png;base64,") == 3
    nightly = json.load(open(os.path.join(work, run_id, "nightly.json")))
    assert nightly["exit_code"] == 0 and nightly["failures"] == []

    # A job's non-zero exit (a regression, a failed cell) fails the submission too, which is
    # what turns a scheduled night red.
    failing = subprocess.run([RAY, "job", "submit", "--", sys.executable, "-c",
                              "import sys; sys.exit(1)"], env=client, capture_output=True,
                             text=True, timeout=300)
    assert failing.returncode != 0
    assert "failed" in (failing.stdout + failing.stderr).lower()
