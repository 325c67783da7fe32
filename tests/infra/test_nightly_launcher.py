"""infra/kuberay/nightly_launcher.py against a fake Kubernetes API on 127.0.0.1: it runs the scheduled night
(not the day it happens to run), creates that night's RayJob once, re-attaches to it on a retry, re-creates it
after a failure so that the night resumes, and exits with jobs/nightly.py's codes (0, 1, 2, 3)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
NIGHTLY = ROOT / "infra" / "kuberay" / "nightly.yaml"
NS = "canvasflow"
JOB = "canvasflow-nightly-29851320"


def _load_launcher():
    spec = importlib.util.spec_from_file_location(
        "canvasflow_nightly_launcher", ROOT / "infra/kuberay/nightly_launcher.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()


def template() -> dict:
    """The RayJob template shipped in nightly.yaml's ConfigMap."""
    for doc in yaml.safe_load_all(NIGHTLY.read_text()):
        if doc and doc["kind"] == "ConfigMap":
            return yaml.safe_load(doc["data"]["rayjob.yaml"])
    raise AssertionError("no ConfigMap in nightly.yaml")


def status(deployment: str, job: str = "", message: str = "") -> dict:
    return {"jobDeploymentStatus": deployment, "jobStatus": job, "message": message}


RUNNING = status("Running", "RUNNING")
SUCCEEDED = status("Complete", "SUCCEEDED")


class FakeApi:
    """RayJobs and Jobs in one namespace. `progress[name]` lists the statuses a RayJob shows on later GETs."""

    def __init__(self) -> None:
        self.rayjobs: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.progress: dict[str, list[dict]] = {}
        self.after_create: dict[str, list[dict]] = {}  # progress of a RayJob created by the launcher
        self.calls: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.fail_next: list[int] = []  # HTTP statuses to answer before serving normally

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        self.calls.append((method, path))
        if self.fail_next:
            return self.fail_next.pop(0), {"message": "injected"}
        match = re.fullmatch(
            rf"/apis/(ray\.io/v1|batch/v1)/namespaces/{NS}/(rayjobs|jobs)(?:/([\w.-]+))?", path
        )
        if not match:
            return 404, {"message": f"no route {path}"}
        _, kind, name = match.groups()
        store = self.rayjobs if kind == "rayjobs" else self.jobs
        if method == "GET":
            if name not in store:
                return 404, {"message": "not found"}
            if kind == "rayjobs" and self.progress.get(name):
                store[name]["status"] = self.progress[name].pop(0)
            return 200, store[name]
        if method == "POST" and kind == "rayjobs":
            name = body["metadata"]["name"]
            if name in store:
                return 409, {"message": "already exists"}
            store[name] = json.loads(json.dumps(body))
            if name in self.after_create:
                self.progress[name] = self.after_create.pop(name)
            self.created.append(store[name])
            return 201, store[name]
        if method == "DELETE" and name in store:
            return 200, store.pop(name)
        return 404, {"message": "not found"}


@pytest.fixture
def api():
    fake = FakeApi()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, answer = fake.handle(self.command, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def scheduled_job(stamp: str | None) -> dict:
    annotations = {launcher.SCHEDULED_ANNOTATION: stamp} if stamp else {}
    return {
        "metadata": {"name": JOB, "uid": "3f1c0e52-0000-4000-8000-000000000001", "annotations": annotations}
    }


def run(
    api: FakeApi,
    *,
    tz: str = "UTC",
    date: str | None = None,
    job: str | None = JOB,
    today: str = "2026-10-23",
):
    kube = launcher.Kube(api.url, NS, sleep=lambda s: None, attempts=3)
    now = dt.datetime.fromisoformat(f"{today}T10:00:00+00:00")
    return launcher.launch(
        kube,
        template(),
        tz=ZoneInfo(tz),
        date=date,
        job_name=job,
        poll_s=0,
        now=lambda: now,
        sleep=lambda s: None,
    )


def test_a_scheduled_night_creates_its_rayjob_once_and_succeeds(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    api.progress["canvasflow-nightly-2026-10-21"] = [status("Initializing"), RUNNING, RUNNING, SUCCEEDED]
    assert run(api, today="2026-10-22") == 0  # a retry after midnight still runs the scheduled night
    (created,) = api.created
    assert created["metadata"]["name"] == "canvasflow-nightly-2026-10-21"
    assert created["metadata"]["labels"][launcher.NIGHT_LABEL] == "2026-10-21"
    assert created["spec"]["entrypoint"].endswith(" nightly.date=2026-10-21")
    assert created["spec"]["entrypoint"].startswith("python jobs/nightly.py cluster=ray output=s3 ")
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "batch/v1", "kind": "Job", "name": JOB, "uid": api.jobs[JOB]["metadata"]["uid"]}
    ]
    assert created["spec"]["rayClusterSpec"] == template()["spec"]["rayClusterSpec"]


def test_the_night_is_the_scheduled_date_in_the_schedules_time_zone(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T23:30:00Z")
    api.progress["canvasflow-nightly-2026-10-22"] = [SUCCEEDED]
    assert run(api, tz="Europe/Berlin") == 0
    assert [r["metadata"]["name"] for r in api.created] == ["canvasflow-nightly-2026-10-22"]


def test_without_a_scheduled_time_the_night_is_today_in_the_time_zone(api: FakeApi):
    api.jobs[JOB] = scheduled_job(None)  # a Job created by hand from the CronJob
    api.progress["canvasflow-nightly-2026-10-23"] = [SUCCEEDED]
    assert run(api) == 0
    assert api.created[0]["metadata"]["name"] == "canvasflow-nightly-2026-10-23"


def test_an_explicit_date_wins(api: FakeApi):
    api.progress["canvasflow-nightly-2026-09-30"] = [SUCCEEDED]
    assert run(api, date="2026-09-30", job=None) == 0
    assert "ownerReferences" not in api.created[0]["metadata"]


def test_a_retry_attaches_to_the_running_rayjob_instead_of_starting_another(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    name = "canvasflow-nightly-2026-10-21"
    api.rayjobs[name] = {"metadata": {"name": name}, "spec": {}, "status": RUNNING}
    api.progress[name] = [RUNNING, RUNNING, SUCCEEDED]
    assert run(api) == 0
    assert api.created == []
    assert not any(method in ("POST", "DELETE") for method, _ in api.calls)


def test_a_night_that_succeeded_is_not_run_again(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    name = "canvasflow-nightly-2026-10-21"
    api.rayjobs[name] = {"metadata": {"name": name}, "spec": {}, "status": SUCCEEDED}
    assert run(api) == 0
    assert api.created == []


def test_a_failed_night_is_recreated_and_resumes_with_the_same_date(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    name = "canvasflow-nightly-2026-10-21"
    failed = status(
        "Failed", "FAILED", "Job entrypoint command failed with exit code 1, last available logs: ..."
    )
    api.rayjobs[name] = {"metadata": {"name": name}, "spec": {}, "status": failed}
    api.after_create[name] = [RUNNING, SUCCEEDED]
    assert run(api) == 0
    assert ("DELETE", f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/{name}") in api.calls
    (created,) = api.created
    assert created["spec"]["entrypoint"].endswith("nightly.date=2026-10-21")


@pytest.mark.parametrize(
    ("final", "code"),
    [
        (status("Failed", "FAILED", "Job entrypoint command failed with exit code 1, last logs"), 1),
        (status("Complete", "FAILED", "Job entrypoint command failed with exit code 3, last logs"), 3),
        (status("Failed", "FAILED", "Job entrypoint command failed with exit code 2, last logs"), 2),
        (status("Failed", "", "The RayJob has passed the activeDeadlineSeconds."), 1),
        (status("ValidationFailed", "", "invalid spec"), 2),
    ],
    ids=["shards-failed", "lock-held", "could-not-start", "deadline", "invalid"],
)
def test_exit_codes_follow_the_nights_outcome(api: FakeApi, final: dict, code: int):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    api.progress["canvasflow-nightly-2026-10-21"] = [RUNNING, final]
    assert run(api) == code


def test_transient_api_errors_are_retried(api: FakeApi):
    api.jobs[JOB] = scheduled_job("2026-10-21T02:00:00Z")
    api.progress["canvasflow-nightly-2026-10-21"] = [SUCCEEDED]
    api.fail_next = [503, 500]
    assert run(api) == 0


def test_a_template_that_sets_the_date_itself_is_refused(api: FakeApi, tmp_path: Path):
    bad = template()
    bad["spec"]["entrypoint"] += " nightly.date=2026-01-01"
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(bad))
    code = launcher.main(
        ["--template", str(path), "--timezone", "UTC", "--api-server", api.url, "--namespace", NS]
    )
    assert code == 2
    assert api.created == []


def test_main_runs_against_an_api_server(api: FakeApi, tmp_path: Path):
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(template()))
    api.progress["canvasflow-nightly-2026-08-01"] = [SUCCEEDED]
    argv = ["--template", str(path), "--timezone", "UTC", "--date", "2026-08-01", "--poll-seconds", "0"]
    assert launcher.main([*argv, "--api-server", api.url, "--namespace", NS]) == 0
    assert launcher.main([*argv[:3], "Not/AZone", "--api-server", api.url]) == 2


def test_a_backfill_passes_its_overrides_after_the_date(api: FakeApi):
    api.progress["canvasflow-nightly-2026-09-30"] = [SUCCEEDED]
    kube = launcher.Kube(api.url, NS, sleep=lambda s: None)
    code = launcher.launch(
        kube,
        template(),
        tz=ZoneInfo("UTC"),
        date="2026-09-30",
        overrides=("nightly.allow_late=true",),
        poll_s=0,
        sleep=lambda s: None,
    )
    assert code == 0
    assert api.created[0]["spec"]["entrypoint"].endswith(" nightly.date=2026-09-30 nightly.allow_late=true")
    for bad in ("nightly.date=2026-01-01", "two words=x", "novalue"):
        with pytest.raises(launcher.LaunchError, match="--override"):
            launcher.render(template(), dt.date(2026, 9, 30), None, (bad,))


def cronjob_job_spec() -> dict:
    """The Job spec of nightly.yaml's CronJob."""
    for doc in yaml.safe_load_all(NIGHTLY.read_text()):
        if doc and doc["kind"] == "CronJob":
            return doc["spec"]["jobTemplate"]["spec"]
    raise AssertionError("no CronJob in nightly.yaml")


def started_job(started: str) -> dict:
    """The scheduled Job as the API server shows it once running: its deadline, its start time."""
    job = scheduled_job("2026-10-21T02:00:00Z")
    job["spec"] = {"activeDeadlineSeconds": cronjob_job_spec()["activeDeadlineSeconds"]}
    job["status"] = {"startTime": started}
    return job


def test_the_first_attempts_rayjob_keeps_the_templates_deadline(api: FakeApi):
    api.jobs[JOB] = started_job("2026-10-21T02:00:05Z")
    api.progress["canvasflow-nightly-2026-10-21"] = [SUCCEEDED]
    kube = launcher.Kube(api.url, NS, sleep=lambda s: None, attempts=3)
    now = dt.datetime(2026, 10, 21, 2, 0, 30, tzinfo=dt.timezone.utc)
    assert launcher.launch(kube, template(), tz=ZoneInfo("UTC"), job_name=JOB, poll_s=0, now=lambda: now) == 0
    (created,) = api.created
    assert created["spec"]["activeDeadlineSeconds"] == template()["spec"]["activeDeadlineSeconds"]


def test_a_late_retrys_rayjob_ends_before_the_job_does(api: FakeApi):
    # Attempt 1 ran 10 h and failed; the retry's RayJob must not get a fresh 21 h: the Job dies at 22 h (its
    # activeDeadlineSeconds kills the launcher, not the RayJob), and the RayJob would run into the next night.
    job_deadline = cronjob_job_spec()["activeDeadlineSeconds"]
    api.jobs[JOB] = started_job("2026-10-21T02:00:00Z")
    name = "canvasflow-nightly-2026-10-21"
    failed = status("Failed", "FAILED", "Job entrypoint command failed with exit code 1, last logs")
    api.rayjobs[name] = {"metadata": {"name": name}, "spec": {}, "status": failed}
    api.after_create[name] = [SUCCEEDED]
    kube = launcher.Kube(api.url, NS, sleep=lambda s: None, attempts=3)
    now = dt.datetime(2026, 10, 21, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert launcher.launch(kube, template(), tz=ZoneInfo("UTC"), job_name=JOB, poll_s=0, now=lambda: now) == 0
    (created,) = api.created
    spec = created["spec"]
    job_ends = dt.datetime(2026, 10, 21, 2, 0, 0, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=job_deadline)
    # KubeRay fails the RayJob at its deadline and deletes the cluster ttlSecondsAfterFinished later.
    rayjob_ends = now + dt.timedelta(seconds=spec["activeDeadlineSeconds"] + spec["ttlSecondsAfterFinished"])
    assert rayjob_ends < job_ends
    assert spec["activeDeadlineSeconds"] >= job_deadline - 10 * 3600 - 3600  # not needlessly short


def test_a_retry_with_no_time_left_in_the_job_does_not_start_a_rayjob(api: FakeApi):
    api.jobs[JOB] = started_job("2026-10-21T02:00:00Z")
    kube = launcher.Kube(api.url, NS, sleep=lambda s: None, attempts=3)
    deadline = cronjob_job_spec()["activeDeadlineSeconds"]
    now = dt.datetime(2026, 10, 21, 2, 0, 0, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=deadline - 900)
    api.after_create["canvasflow-nightly-2026-10-21"] = [SUCCEEDED]  # (a launcher that creates it returns)
    with pytest.raises(launcher.LaunchError, match="activeDeadlineSeconds"):
        launcher.launch(kube, template(), tz=ZoneInfo("UTC"), job_name=JOB, poll_s=0, now=lambda: now)
    assert api.created == []


def test_an_api_server_down_at_start_is_retried_by_the_job_not_taken_for_a_configuration_error(
    api: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(template()))
    argv = ["--template", str(path), "--timezone", "UTC", "--api-server", api.url, "--namespace", NS]
    monkeypatch.setitem(launcher.Kube.__init__.__kwdefaults__, "sleep", lambda s: None)  # no backoff waits
    api.fail_next = [503] * 10  # beyond the client's retries: exit 1, which the Job retries
    assert launcher.main([*argv, "--job-name", JOB]) == 1
    api.fail_next = [403]  # forbidden (RBAC): configuration, exit 2 (podFailurePolicy: not retried)
    assert launcher.main([*argv, "--job-name", JOB]) == 2
