#!/usr/bin/env python3
"""Starts one night's canvasflow RayJob from a Kubernetes CronJob, waits for it, exits with its outcome.

The CronJob of infra/kuberay/nightly.yaml runs this in the canvasflow image (it needs Python >= 3.9 and
PyYAML, nothing else; it talks to the Kubernetes API with the pod's service account token). It:

1. picks the night: --date if given, else the date (in --timezone) of the CronJob's scheduled time, read
   from the batch.kubernetes.io/cronjob-scheduled-timestamp annotation of this pod's Job (Kubernetes >=
   1.28), else today in --timezone. A retried pod therefore works on the same night, even after midnight;
2. creates RayJob <template name>-<YYYY-MM-DD> from the template, with `nightly.date=<night>` appended to its
   entrypoint and this pod's Job as its owner (the CronJob's history limits then garbage-collect it). If that
   RayJob exists already (this is a retry), it waits for it when it is still running, reports it when it
   succeeded, and deletes and re-creates it when it failed: jobs/nightly.py resumes the night's run, keeping
   every committed shard. The RayJob's activeDeadlineSeconds is lowered to what is left of the Job's (less
   the cluster's ttlSecondsAfterFinished and 10 minutes), so that a RayJob created by a late retry still
   ends before the Job does and never runs into the next night;
3. waits until the RayJob is finished and exits 0 when it succeeded; 3 when jobs/nightly.py refused to run
   (another run holds the night's lock, or the night is older than the newest complete one), 2 when it could
   not start (or the RayJob is invalid), 1 for any other failure, including an API server that does not
   answer (the CronJob's Job retries 1, not 2 or 3: see its podFailurePolicy).

    python nightly_launcher.py --template /etc/canvasflow-nightly/rayjob.yaml --timezone UTC
    python nightly_launcher.py ... --date 2026-10-20 --override nightly.allow_late=true   # a backfill
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

logger = logging.getLogger("nightly-launcher")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SCHEDULED_ANNOTATION = "batch.kubernetes.io/cronjob-scheduled-timestamp"
NIGHT_LABEL = "canvasflow.io/night"
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_NOT_STARTED, EXIT_LOCKED = 0, 1, 2, 3
TERMINAL = ("Complete", "Failed", "ValidationFailed")
# A RayJob created by a retried pod must end before the Job does: when the Job passes its
# activeDeadlineSeconds Kubernetes kills the launcher, not the RayJob, which would run on into the next night.
# KubeRay fails a RayJob at its own activeDeadlineSeconds but leaves the cluster (and the driver on it) up for
# ttlSecondsAfterFinished, so the cap is the Job's remaining time less that TTL and this slack.
DEADLINE_SLACK_S = 600
MIN_RAYJOB_DEADLINE_S = 600  # less than this left: the night cannot run in this Job (exit 2, not retried)


class KubeError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Kubernetes API answered {status}: {message}")
        self.status = status


class LaunchError(RuntimeError):
    """The night cannot be launched; the message says why (exit code 2)."""


class Kube:
    """The few Kubernetes API calls this needs, over HTTPS with the pod's service account (stdlib only)."""

    def __init__(
        self,
        server: str,
        namespace: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 30.0,
        attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server.rstrip("/")
        self.namespace = namespace
        self.token_file = token_file
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.sleep = sleep
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def in_cluster(cls, namespace: str | None = None) -> Kube:
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            raise LaunchError(
                "not inside a Kubernetes pod (KUBERNETES_SERVICE_HOST unset); give --api-server"
            )
        if ":" in host:  # IPv6
            host = f"[{host}]"
        ns = namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip()
        return cls(
            f"https://{host}:{port}",
            ns,
            token_file=SERVICE_ACCOUNT / "token",
            ca_file=SERVICE_ACCOUNT / "ca.crt",
        )

    def rayjob_path(self, name: str = "") -> str:
        return f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs" + (f"/{name}" if name else "")

    def job_path(self, name: str) -> str:
        return f"/apis/batch/v1/namespaces/{self.namespace}/jobs/{name}"

    def call(self, method: str, path: str, body: dict | None = None) -> dict | None:
        """The decoded answer; None for 404. Retries connection errors, 429 and 5xx with backoff."""
        for attempt in range(1, self.attempts + 1):
            request = urllib.request.Request(self.server + path, method=method)
            request.add_header("Accept", "application/json")
            if self.token_file is not None:  # re-read each time: projected tokens are rotated
                request.add_header("Authorization", "Bearer " + self.token_file.read_text().strip())
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(
                    request, data=data, timeout=self.timeout_s, context=self.context
                ) as r:
                    text = r.read().decode() or "{}"
                    return json.loads(text)
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                detail = _message(e.read().decode(errors="replace"))
                if (e.code != 429 and e.code < 500) or attempt == self.attempts:
                    raise KubeError(e.code, f"{method} {path}: {detail}") from None
                problem = f"{e.code} {detail}"
            except (urllib.error.URLError, OSError) as e:
                if attempt == self.attempts:
                    raise KubeError(0, f"{method} {path}: {e}") from None
                problem = str(e)
            logger.warning("%s %s failed (%s); retrying", method, path, problem)
            self.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")


def _message(text: str) -> str:
    try:
        return json.loads(text).get("message", text)
    except (ValueError, AttributeError):
        return text[:500]


# ------------------------------------------------------------------------------------------------- night
def parse_timestamp(value: str) -> dt.datetime:
    stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return stamp


def pick_night(tz: ZoneInfo, *, date: str | None, job: dict | None, now: dt.datetime) -> tuple[dt.date, str]:
    """The night to run and where it came from."""
    if date:
        return dt.date.fromisoformat(date), "--date"
    annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
    stamp = annotations.get(SCHEDULED_ANNOTATION)
    if stamp:
        try:
            return parse_timestamp(stamp).astimezone(tz).date(), f"scheduled time {stamp}"
        except ValueError:
            logger.warning("cannot parse %s=%r; using today's date", SCHEDULED_ANNOTATION, stamp)
    return now.astimezone(tz).date(), f"today in {tz.key} (no scheduled time found)"


def job_time_left(job: dict | None, now: dt.datetime) -> float | None:
    """Seconds until the Job reaches its activeDeadlineSeconds (counted from its status.startTime, as the
    Job controller does); None when it has no deadline or has not started."""
    if not job:
        return None
    deadline = (job.get("spec") or {}).get("activeDeadlineSeconds")
    started = (job.get("status") or {}).get("startTime")
    if not deadline or not started:
        return None
    return float(deadline) - (now - parse_timestamp(started)).total_seconds()


def cap_deadline(rayjob: dict, time_left: float | None) -> dict:
    """`rayjob` with spec.activeDeadlineSeconds lowered so that it ends, cluster included, within
    `time_left` seconds (the Job's remaining time); unchanged when it already does."""
    if time_left is None:
        return rayjob
    spec = rayjob["spec"]
    cap = int(time_left - int(spec.get("ttlSecondsAfterFinished") or 0) - DEADLINE_SLACK_S)
    if cap < MIN_RAYJOB_DEADLINE_S:
        raise LaunchError(
            f"only {max(time_left, 0):.0f}s left before this Job's activeDeadlineSeconds: too little to run "
            "the night (start it again with the launcher's --date, see infra/README.md)"
        )
    current = spec.get("activeDeadlineSeconds")
    if current is None or int(current) > cap:
        spec["activeDeadlineSeconds"] = cap
    return rayjob


def render(template: dict, night: dt.date, owner: dict | None, overrides: tuple[str, ...] = ()) -> dict:
    """The night's RayJob: the template with a dated name, `nightly.date=...` (and `overrides`) appended to
    its entrypoint, and an owner reference."""
    if template.get("kind") != "RayJob" or not str(template.get("apiVersion", "")).startswith("ray.io/"):
        raise LaunchError("the template is not a ray.io RayJob")
    rayjob = copy.deepcopy(template)
    meta = rayjob.setdefault("metadata", {})
    base = meta.get("name")
    if not base:
        raise LaunchError("the template has no metadata.name")
    entrypoint = str(rayjob.get("spec", {}).get("entrypoint", "")).strip()
    if not entrypoint:
        raise LaunchError("the template has no spec.entrypoint")
    if "nightly.date=" in entrypoint:
        raise LaunchError("the template's entrypoint sets nightly.date; the launcher appends it")
    for override in overrides:
        if not re.fullmatch(r"[\w.+~-]+=\S*", override) or override.startswith("nightly.date="):
            raise LaunchError(
                f"--override {override!r}: give KEY=VALUE without spaces (and not nightly.date)"
            )
    extra = "".join(f" {o}" for o in overrides)
    rayjob["spec"]["entrypoint"] = f"{entrypoint} nightly.date={night.isoformat()}{extra}"
    meta["name"] = f"{base}-{night.isoformat()}"
    meta.pop("namespace", None)  # the launcher's namespace
    for key in ("resourceVersion", "uid", "creationTimestamp"):
        meta.pop(key, None)
    meta.setdefault("labels", {})[NIGHT_LABEL] = night.isoformat()
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "batch/v1", "kind": "Job", "name": owner["name"], "uid": owner["uid"]}
        ]
    rayjob.pop("status", None)
    return rayjob


# -------------------------------------------------------------------------------------------- outcome
def outcome(rayjob: dict) -> int | None:
    """The exit code a finished RayJob stands for; None while it is not finished."""
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    if deployment not in TERMINAL:
        return None
    if deployment == "ValidationFailed":
        return EXIT_NOT_STARTED
    if deployment == "Complete" and status.get("jobStatus") == "SUCCEEDED":
        return EXIT_SUCCEEDED
    # Ray's message for a failed entrypoint: "Job entrypoint command failed with exit code N, ..."
    code = re.search(r"exit code (\d+)", status.get("message") or "")
    if code and int(code.group(1)) in (EXIT_NOT_STARTED, EXIT_LOCKED):
        return int(code.group(1))
    return EXIT_FAILED


def describe(rayjob: dict) -> str:
    status = rayjob.get("status") or {}
    parts = [
        f"deployment={status.get('jobDeploymentStatus') or 'New'}",
        f"job={status.get('jobStatus') or '-'}",
    ]
    if status.get("reason"):
        parts.append(f"reason={status['reason']}")
    if status.get("message"):
        parts.append(f"message={status['message'][:300]!r}")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------- run
def launch(
    kube: Kube,
    template: dict,
    *,
    tz: ZoneInfo,
    date: str | None = None,
    job_name: str | None = None,
    overrides: tuple[str, ...] = (),
    poll_s: float = 30.0,
    gone_timeout_s: float = 600.0,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    job = kube.call("GET", kube.job_path(job_name)) if job_name else None
    if job_name and job is None:
        logger.warning("job %s not found; the RayJob will have no owner", job_name)
    owner = None
    if job is not None:
        owner = {"name": job["metadata"]["name"], "uid": job["metadata"]["uid"]}
    started_at = now()
    night, source = pick_night(tz, date=date, job=job, now=started_at)
    desired = cap_deadline(render(template, night, owner, overrides), job_time_left(job, started_at))
    name = desired["metadata"]["name"]
    logger.info("night %s (%s): RayJob %s/%s", night, source, kube.namespace, name)

    existing = kube.call("GET", kube.rayjob_path(name))
    if existing is not None:
        code = outcome(existing)
        if code is None:
            logger.info("RayJob %s exists and is running (%s); waiting for it", name, describe(existing))
        elif code == EXIT_SUCCEEDED:
            logger.info("RayJob %s already succeeded; nothing to do", name)
            return EXIT_SUCCEEDED
        else:
            logger.info(
                "RayJob %s failed before (%s); deleting it and starting it again (the night's run resumes)",
                name,
                describe(existing),
            )
            delete_and_wait(kube, name, timeout_s=gone_timeout_s, poll_s=min(poll_s, 5.0), sleep=sleep)
            existing = None
    if existing is None:
        try:
            kube.call("POST", kube.rayjob_path(), desired)
            logger.info(
                "created RayJob %s (activeDeadlineSeconds=%s): %s",
                name,
                desired["spec"].get("activeDeadlineSeconds"),
                desired["spec"]["entrypoint"],
            )
        except KubeError as e:
            if e.status != 409:
                raise
            logger.info("RayJob %s was created meanwhile; waiting for it", name)
    logger.info("driver log: kubectl -n %s logs -f job/%s", kube.namespace, name)
    return wait(kube, name, poll_s=poll_s, sleep=sleep)


def delete_and_wait(
    kube: Kube, name: str, *, timeout_s: float, poll_s: float, sleep: Callable[[float], None]
) -> None:
    kube.call("DELETE", kube.rayjob_path(name), {"propagationPolicy": "Background"})
    waited = 0.0
    while kube.call("GET", kube.rayjob_path(name)) is not None:
        if waited >= timeout_s:
            raise LaunchError(f"RayJob {name} is still there {timeout_s:.0f}s after its deletion")
        sleep(poll_s)
        waited += poll_s


def wait(kube: Kube, name: str, *, poll_s: float, sleep: Callable[[float], None]) -> int:
    last = None
    while True:
        try:
            rayjob = kube.call("GET", kube.rayjob_path(name))
        except KubeError as e:  # the API server is unreachable for a while: keep waiting
            logger.warning("cannot read RayJob %s: %s", name, e)
            sleep(poll_s)
            continue
        if rayjob is None:
            logger.error("RayJob %s disappeared (deleted by someone?)", name)
            return EXIT_FAILED
        state = describe(rayjob)
        if state != last:
            logger.info("RayJob %s: %s", name, state)
            last = state
        code = outcome(rayjob)
        if code is not None:
            verdict = {
                EXIT_SUCCEEDED: "succeeded",
                EXIT_LOCKED: "was refused: another run holds the lock, or the night is late (not retried)",
                EXIT_NOT_STARTED: "could not start (not retried; fix the configuration)",
            }.get(code, "failed (the Job's retry resumes the night)")
            log = logger.info if code == EXIT_SUCCEEDED else logger.error
            log("RayJob %s %s", name, verdict)
            return code
        sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", required=True, help="RayJob YAML whose name gets -YYYY-MM-DD appended")
    parser.add_argument("--timezone", required=True, help="IANA zone of the schedule, as nightly.timezone")
    parser.add_argument("--date", help="YYYY-MM-DD: run this night instead of the scheduled one")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="KEY=VALUE appended to the entrypoint, e.g. nightly.allow_late=true for a backfill; repeatable",
    )
    parser.add_argument("--job-name", default=os.environ.get("JOB_NAME"), help="this pod's Job ($JOB_NAME)")
    parser.add_argument("--namespace", help="default: the pod's namespace")
    parser.add_argument("--api-server", help="default: the in-cluster API server (for tests and debugging)")
    parser.add_argument("--poll-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    try:
        import yaml

        tz = ZoneInfo(args.timezone)
        template = yaml.safe_load(Path(args.template).read_text())
        if args.api_server:
            kube = Kube(args.api_server, args.namespace or "default")
        else:
            kube = Kube.in_cluster(args.namespace)
        return launch(
            kube,
            template,
            tz=tz,
            date=args.date,
            job_name=args.job_name,
            overrides=tuple(args.override),
            poll_s=args.poll_seconds,
        )
    except ZoneInfoNotFoundError:
        logger.error("--timezone=%r is not an IANA time zone name", args.timezone)
    except KubeError as e:
        logger.error("%s", e)
        if e.status == 0 or e.status == 429 or e.status >= 500:  # the API server, not the configuration
            return EXIT_FAILED  # retried by the Job (podFailurePolicy fails it at once on 2)
    except (LaunchError, OSError, ValueError) as e:
        logger.error("%s", e)
    return EXIT_NOT_STARTED


if __name__ == "__main__":
    sys.exit(main())
