"""infra/: every manifest parses and has the fields Kubernetes, KubeRay and the Ray cluster launcher require;
the copies of the cluster spec agree; every `python jobs/X.py ...` command in the manifests and the cluster
docs names a script the project has, with overrides that compose against conf/; the IAM policy is
least-privilege and is what its renderer prints; user-filled values are <YOUR_...> tokens documented in
infra/README.md; the shell scripts parse."""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from pipeline.config import JobConfig, register_configs, to_job_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCS = [ROOT / "docs" / "cluster.md", INFRA / "README.md"]
PLACEHOLDER = re.compile(r"<YOUR_[A-Z0-9_]+>")
IMAGE_CODE_DIR = "/home/ray/canvasflow"  # where infra/docker/Dockerfile puts the code
NAMESPACE = "canvasflow"
register_configs()


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


render_policy = load_module(INFRA / "iam" / "render_policy.py", "canvasflow_render_policy")


def constraint(name: str) -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{name} is not pinned in constraints.txt")


# ------------------------------------------------------------------------------------------- documents
@dataclass
class Doc:
    where: str  # file, document index, and "(embedded)" for a RayJob template inside a ConfigMap
    body: dict[str, Any]


def infra_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix in suffixes)


@functools.cache
def kube_docs() -> tuple[Doc, ...]:
    docs = []
    for path in infra_files(".yaml", ".yml"):
        if path.parent.name != "kuberay":
            continue
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is None:
                continue
            docs.append(Doc(f"{rel(path)}#{i}", body))
            if body.get("kind") == "ConfigMap":
                for key, text in (body.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        docs.append(Doc(f"{rel(path)}#{i} data.{key} (embedded)", yaml.safe_load(text)))
    return tuple(docs)


def of_kind(kind: str) -> list[Doc]:
    return [d for d in kube_docs() if d.body.get("kind") == kind]


def the(kind: str) -> Doc:
    found = of_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {[d.where for d in found]}"
    return found[0]


@pytest.mark.parametrize("path", infra_files(".yaml", ".yml", ".json"), ids=rel)
def test_every_yaml_and_json_under_infra_parses(path: Path):
    text = path.read_text()
    if path.suffix == ".json":
        assert isinstance(json.loads(text), dict)
    else:
        assert [d for d in yaml.safe_load_all(text) if d is not None], f"{rel(path)} has no document"


def test_the_recipes_are_all_there():
    kinds = sorted(d.body["kind"] for d in kube_docs())
    for kind in ("RayCluster", "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "Namespace"):
        assert kind in kinds, kind
    assert (INFRA / "ray" / "cluster-aws.yaml").is_file()
    assert (INFRA / "iam" / "output-prefix-policy.json").is_file()


# -------------------------------------------------------------------------------------------- kubernetes
def test_every_kubernetes_object_has_api_version_kind_name_and_namespace():
    for doc in kube_docs():
        body = doc.body
        api = body.get("apiVersion")
        assert isinstance(api, str) and ("/" in api or api == "v1"), f"{doc.where}: apiVersion"
        assert isinstance(body.get("kind"), str), doc.where
        name = body.get("metadata", {}).get("name")
        assert name and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, doc.where
        if body["kind"] == "Namespace" or "(embedded)" in doc.where:
            continue  # the launcher creates the embedded RayJob in its own namespace
        assert body["metadata"].get("namespace") == NAMESPACE, f"{doc.where}: namespace"
    assert [d.body["metadata"]["name"] for d in of_kind("Namespace")] == [NAMESPACE]


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec in the manifests: head and worker groups of each cluster spec, the CronJob's pod."""
    specs = []
    for where, cluster in cluster_specs():
        specs.append((f"{where} head", cluster["headGroupSpec"]["template"]["spec"]))
        for group in cluster["workerGroupSpecs"]:
            specs.append((f"{where} group {group.get('groupName')}", group["template"]["spec"]))
    for doc in of_kind("CronJob"):
        specs.append((doc.where, doc.body["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def cluster_specs() -> list[tuple[str, dict]]:
    specs = [(d.where, d.body["spec"]) for d in of_kind("RayCluster")]
    specs += [
        (d.where, d.body["spec"]["rayClusterSpec"])
        for d in of_kind("RayJob")
        if "rayClusterSpec" in d.body["spec"]
    ]
    return specs


def test_raycluster_specs_have_what_kuberay_requires():
    ray_version = constraint("ray")
    assert cluster_specs(), "no RayCluster spec"
    for where, spec in cluster_specs():
        assert spec.get("rayVersion") == ray_version, f"{where}: rayVersion must be constraints.txt's ray"
        head = spec["headGroupSpec"]
        assert isinstance(head.get("rayStartParams"), dict), f"{where}: headGroupSpec.rayStartParams"
        assert all(isinstance(v, str) for v in head["rayStartParams"].values()), f"{where}: strings only"
        assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: actors must not land on the head"
        assert head["template"]["spec"]["containers"][0]["image"], where
        groups = spec["workerGroupSpecs"]
        assert groups, f"{where}: no workerGroupSpecs"
        for group in groups:
            assert group.get("groupName"), where
            assert isinstance(group.get("rayStartParams"), dict), (
                f"{where}: workerGroupSpecs[].rayStartParams"
            )
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
            assert 0 <= group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", 2**31)
            containers = group["template"]["spec"]["containers"]
            assert containers and containers[0]["image"], where
            resources = containers[0]["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert gpus is not None and int(gpus) >= 1, (
                f"{where}: the worker group needs nvidia.com/gpu limits"
            )
            assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, f"{where}: GPU requests"
            tolerated = {t.get("key") for t in group["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated, f"{where}: GPU nodes are usually tainted nvidia.com/gpu"
        for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
            assert params.get("metrics-export-port") == "8080", f"{where}: docs/cluster.md promises :8080"


# The KubeRay release whose CRD first has a field the manifests use (ray-operator/config/crd/bases of the
# ray-project/kuberay tags): with an older CRD `kubectl apply` refuses the field (strict field validation) or
# the API server prunes it, and e.g. a cluster meant to require a token would run without one.
KUBERAY_FIELD_SINCE = {
    ("RayCluster", "authOptions"): (1, 5, 1),
    ("RayJob", "backoffLimit"): (1, 2, 0),
}
KUBERAY_MINIMUM_RE = re.compile(r"KubeRay(?: operator)? \(?>= ?(\d+)\.(\d+)(?:\.(\d+))?")


def stated_kuberay_minimums() -> dict[str, tuple[int, int, int]]:
    found = {}
    for path in [*infra_files(".yaml", ".yml"), INFRA / "README.md"]:
        if path.parent.name != "kuberay" and path.name != "README.md":
            continue
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if "RayCronJob" in line:  # RayCronJob's own minimum, not the manifests'
                continue
            for m in KUBERAY_MINIMUM_RE.finditer(line):
                found[f"{rel(path)}:{line_no}"] = (int(m[1]), int(m[2]), int(m[3] or 0))
    return found


def test_the_stated_minimum_kuberay_has_every_field_the_manifests_use():
    stated = stated_kuberay_minimums()
    for path in ("infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml", "infra/README.md"):
        assert any(w.startswith(path + ":") for w in stated), f"{path} states no minimum KubeRay version"
    assert len(set(stated.values())) == 1, f"the stated minimum KubeRay versions disagree: {stated}"
    minimum = next(iter(stated.values()))
    used = set()
    for _, spec in cluster_specs():
        used |= {("RayCluster", key) for key in spec}
    for doc in of_kind("RayJob"):
        used |= {("RayJob", key) for key in doc.body["spec"]}
    for field, since in KUBERAY_FIELD_SINCE.items():
        if field in used:
            assert minimum >= since, f"{field} needs KubeRay >= {since}; the files state {minimum}"


def test_the_copies_of_the_cluster_spec_agree():
    specs = cluster_specs()
    assert len(specs) >= 3, [w for w, _ in specs]
    first_where, first = specs[0]
    for where, spec in specs[1:]:
        assert spec == first, f"{where} differs from {first_where}: keep the cluster specs identical"


def test_ray_pods_get_s3_access_from_their_identity_not_from_literal_credentials():
    accounts = {d.body["metadata"]["name"]: d.body for d in of_kind("ServiceAccount")}
    for where, spec in pod_specs():
        name = spec.get("serviceAccountName")
        assert name in accounts, f"{where}: serviceAccountName {name!r} is not defined in infra/kuberay/"
        for container in spec["containers"]:
            for env in container.get("env", []):
                if re.match(r"AWS_(ACCESS_KEY|SECRET|SESSION)", env["name"]):
                    assert "valueFrom" in env and "value" not in env, (
                        f"{where}: {env['name']} must be a secret ref"
                    )
    ray_account = accounts["canvasflow-ray"]
    assert "eks.amazonaws.com/role-arn" in ray_account["metadata"].get("annotations", {})
    for path in infra_files(".yaml", ".yml", ".json", ".sh", ".md", ".py"):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{rel(path)}: an access key id"
        assert not re.search(r"aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{30,}", text, re.I), rel(path)


def test_images_are_one_and_hold_the_code():
    images = {c["image"] for _, spec in pod_specs() for c in spec["containers"]}
    assert len(images) == 1, f"one image for head, workers and launcher: {images}"
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_CODE_DIR}" in dockerfile
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([\d.]+)-", dockerfile, re.MULTILINE)
    assert base and base.group(1) == constraint("ray"), "the image's Ray must be constraints.txt's"
    for script in re.findall(r"\binfra/[\w/.-]+\.sh\b", dockerfile):
        assert (ROOT / script).is_file(), script


def test_rayjobs_run_a_command_of_the_project_on_a_cluster_they_define():
    assert of_kind("RayJob")
    for doc in of_kind("RayJob"):
        spec = doc.body["spec"]
        assert spec.get("entrypoint", "").strip(), f"{doc.where}: entrypoint"
        assert "rayClusterSpec" in spec or "clusterSelector" in spec, f"{doc.where}: no cluster"
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert runtime_env["working_dir"] == IMAGE_CODE_DIR, f"{doc.where}: the image's code"
        # working_dir is a path of the submitter pod's filesystem: only `ray job submit` in a pod uploads it.
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "SidecarMode"), doc.where
        assert spec.get("shutdownAfterJobFinishes") is True, f"{doc.where}: delete the cluster afterwards"
        assert spec.get("ttlSecondsAfterFinished", 0) >= 0
        assert spec["entrypoint"].split()[:2][0] == "python", doc.where


def test_nightly_cronjob_never_overlaps_and_runs_the_scheduled_night():
    cron = the("CronJob")
    spec = cron.body["spec"]
    assert len(spec["schedule"].split()) == 5, "a five-field cron schedule"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] <= 6 * 3600
    ZoneInfo(spec["timeZone"])
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    rules = job["podFailurePolicy"]["rules"]
    fail_job = [r for r in rules if r["action"] == "FailJob"]
    assert fail_job and sorted(fail_job[0]["onExitCodes"]["values"]) == [2, 3], "no retry for exit 2 and 3"
    assert fail_job[0]["onExitCodes"]["containerName"] == pod["containers"][0]["name"]

    command = pod["containers"][0]["command"]
    launcher = Path(command[1])
    assert launcher.is_relative_to(IMAGE_CODE_DIR)
    assert (ROOT / launcher.relative_to(IMAGE_CODE_DIR)).is_file(), f"{launcher} is not in the checkout"
    timezone = command[command.index("--timezone") + 1]
    template_path = Path(command[command.index("--template") + 1])
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (volume,) = [n for n, p in mounts.items() if Path(p) == template_path.parent]
    config_map = volumes[volume]["configMap"]["name"]
    (holder,) = [d for d in of_kind("ConfigMap") if d.body["metadata"]["name"] == config_map]
    template = yaml.safe_load(holder.body["data"][template_path.name])
    entrypoint = template["spec"]["entrypoint"]
    assert "nightly.date=" not in entrypoint, "the launcher appends the scheduled night"
    nightly_tz = re.search(r"\bnightly\.timezone=(\S+)", entrypoint)
    assert nightly_tz, "the nightly entrypoint states its time zone"
    assert spec["timeZone"] == timezone == nightly_tz.group(1), (
        "schedule, launcher and nightly.timezone agree"
    )
    assert template["spec"]["activeDeadlineSeconds"] < job["activeDeadlineSeconds"] < 24 * 3600
    # The RayJob ends, cluster included (KubeRay deletes it ttlSecondsAfterFinished after the deadline), before
    # the Job does; the launcher lowers it on retries only, so the first attempt gets the template's value.
    launcher = load_module(KUBERAY / "nightly_launcher.py", "canvasflow_nightly_launcher_for_manifests")
    ttl = template["spec"].get("ttlSecondsAfterFinished", 0)
    rayjob_end = template["spec"]["activeDeadlineSeconds"] + ttl
    assert rayjob_end + launcher.DEADLINE_SLACK_S < job["activeDeadlineSeconds"]
    assert template["spec"].get("backoffLimit", 0) == 0, "retries are the Job's (the launcher re-creates)"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "batch.kubernetes.io/job-name" in env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"]


def test_the_launcher_may_do_what_it_does_and_nothing_more():
    pod = the("CronJob").body["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    bindings = [
        d.body
        for d in of_kind("RoleBinding")
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in d.body["subjects"])
    ]
    assert len(bindings) == 1, f"one RoleBinding for {account}"
    binding = bindings[0]
    for subject in binding["subjects"]:
        assert subject.get("namespace") == binding["metadata"]["namespace"]
    assert (
        binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"
    )
    (role,) = [d.body for d in of_kind("Role") if d.body["metadata"]["name"] == binding["roleRef"]["name"]]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("ray.io", "rayjobs", "get"),
        ("ray.io", "rayjobs", "create"),
        ("ray.io", "rayjobs", "delete"),
        ("batch", "jobs", "get"),
    }
    launcher = (KUBERAY / "nightly_launcher.py").read_text()
    used = set(re.findall(r'kube\.call\("([A-Z]+)", kube\.(\w+)_path', launcher))
    assert used == {("GET", "job"), ("GET", "rayjob"), ("POST", "rayjob"), ("DELETE", "rayjob")}, used


# ---------------------------------------------------------------------------------------- ray launcher
@functools.cache
def launcher_config() -> dict:
    return yaml.safe_load((INFRA / "ray" / "cluster-aws.yaml").read_text())


def test_cluster_launcher_config_has_the_required_keys_and_passes_rays_schema():
    config = launcher_config()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = []
    for name, node_type in types.items():
        node = node_type["node_config"]
        assert node["IamInstanceProfile"]["Arn"], f"{name}: an instance profile for S3 access"
        assert node["ImageId"], name
        if name != config["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
            if re.match(r"^(p[3-9]|g[4-9])[a-z0-9-]*\.", node["InstanceType"]):
                gpu_types.append(name)
    assert gpu_types, "a GPU worker type (p*/g* instances)"
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "no actors on the head"
    assert config["docker"]["image"].startswith(f"rayproject/ray:{constraint('ray')}-")

    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_cluster_launcher_files_and_commands_exist():
    config = launcher_config()
    for remote, local in config["file_mounts"].items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} (relative to the repository root)"
    mounted = {remote: ROOT / local for remote, local in config["file_mounts"].items()}
    commands = config["setup_commands"] + config["initialization_commands"]
    for command in commands:
        for script in re.findall(r"(/home/ray/[\w/.-]+\.sh)", command):
            for remote, local in mounted.items():
                if script.startswith(remote + "/"):
                    assert (local / script[len(remote) + 1 :]).is_file(), script
                    break
            else:
                raise AssertionError(f"{script} is not under a file mount")
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert sum("--metrics-export-port=8080" in c for c in starts) == 2, "metrics on every node (docs)"


# ---------------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class Command:
    where: str
    script: str  # jobs/X.py
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: python {self.script} {' '.join(self.args)}"


COMMAND_RE = re.compile(r"(?<![\w/.-])(?:\S*/)?python3?\s+(jobs/[\w.-]+\.py)\b(.*)")


def commands_in_text(text: str, where: str, *, comments_only: bool) -> list[Command]:
    if comments_only:  # a YAML file: its comments (values are checked from the parsed documents)
        text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#"))
    text = re.sub(r"\\\n[ \t]*", " ", text)  # shell line continuations
    found = []
    for line in text.splitlines():
        for match in COMMAND_RE.finditer(line):
            rest = re.split(r"`|;|&&|\|\||\s\|\s|\s#", match.group(2))[0]
            found.append(Command(where, match.group(1), tuple(shlex.split(rest))))
    return found


def commands_in_values(value: Any, where: str) -> list[Command]:
    if isinstance(value, dict):
        return [c for k, v in value.items() for c in commands_in_values(v, f"{where}.{k}")]
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value) and any(
            re.fullmatch(r"jobs/[\w.-]+\.py", v) for v in value
        ):
            return commands_in_text(shlex.join(value), where, comments_only=False)
        return [c for i, v in enumerate(value) for c in commands_in_values(v, f"{where}[{i}]")]
    if isinstance(value, str) and "jobs/" in value:
        return commands_in_text(value, where, comments_only=False)
    return []


def all_commands() -> list[Command]:
    found = []
    for path in infra_files(".yaml", ".yml"):
        found += commands_in_text(path.read_text(), rel(path), comments_only=True)
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body and body.get("kind") == "ConfigMap":  # embedded YAML: its comments here, values below
                embedded = {k: v for k, v in body.get("data", {}).items() if k.endswith((".yaml", ".yml"))}
                for key, text in embedded.items():
                    found += commands_in_text(text, f"{rel(path)}#{i} data.{key}", comments_only=True)
                body = {**body, "data": {k: v for k, v in body["data"].items() if k not in embedded}}
            found += commands_in_values(body, f"{rel(path)}#{i}")
    for doc in kube_docs():
        if "(embedded)" in doc.where:
            found += commands_in_values(doc.body, doc.where)
    for path in [*DOCS, *infra_files(".sh")]:
        if path.is_file():
            found += commands_in_text(path.read_text(), rel(path), comments_only=False)
    return found


def test_commands_are_found_where_they_should_be():
    commands = all_commands()
    where = {c.where.split("#")[0].split(":")[0].split(" ")[0] for c in commands}
    for path in ("infra/kuberay/rayjob.yaml", "infra/kuberay/nightly.yaml", "infra/ray/cluster-aws.yaml"):
        assert any(w.startswith(path) for w in where), f"no command found in {path}"
    scripts = {c.script for c in commands}
    assert {"jobs/generate.py", "jobs/nightly.py"} <= scripts, scripts
    nightly = [c for c in commands if c.script == "jobs/nightly.py" and "(embedded)" in c.where]
    assert nightly, "the nightly RayJob template runs jobs/nightly.py"
    for command in nightly:  # the command line agreed with jobs/nightly.py's author
        args = dict(a.split("=", 1) for a in command.args)
        assert args["cluster"] == "ray" and args["output"] == "s3" and args["output.uri"].startswith("s3://")
        assert "nightly.timezone" in args


def hydra_main_target(script: Path) -> tuple[Path, str]:
    """config_path and config_name of the script's @hydra.main."""
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "main":
            keywords = {k.arg: k.value for k in node.keywords}
            if "config_name" in keywords:
                path = ast.literal_eval(keywords["config_path"]) if "config_path" in keywords else "."
                return (script.parent / path).resolve(), ast.literal_eval(keywords["config_name"])
    raise AssertionError(f"{script} has no @hydra.main(config_path=..., config_name=...)")


@functools.cache
def prepare_script(script: str) -> tuple[Path, str]:
    path = ROOT / script
    config_dir, config_name = hydra_main_target(path)
    runpy.run_path(str(path), run_name="canvasflow_manifest_check")  # its ConfigStore registrations
    return config_dir, config_name


def example_value(token: str) -> str:
    """A stand-in for a <YOUR_...> token inside a command (the user fills in the real one)."""
    return token.strip("<>").lower().replace("_", "-")


def overrides_of(command: Command) -> list[str]:
    overrides, skip = [], False
    for arg in command.args:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c", "--package", "-p"):
            skip = True
            continue
        if arg.startswith("-") or arg == "...":
            continue
        assert "=" in arg or arg.startswith("~"), f"{command}: {arg!r} is not a Hydra override"
        overrides.append(PLACEHOLDER.sub(lambda m: example_value(m.group(0)), arg))
    return overrides


ARGPARSE_SCRIPTS = ("jobs/status.py",)  # reads a run directory: a path and options, no job config


@pytest.mark.parametrize("command", all_commands(), ids=str)
def test_every_command_is_a_script_of_the_project_with_overrides_that_compose(command: Command):
    script = ROOT / command.script
    if not script.is_file():
        if command.script == "jobs/nightly.py":
            pytest.skip("jobs/nightly.py is not in this checkout yet; its commands are checked once it is")
        pytest.fail(f"{command}: {command.script} does not exist")
    if command.script in ARGPARSE_SCRIPTS:  # not a Hydra job: its options are in its --help
        shown = subprocess.run(
            [sys.executable, str(script), "--help"], capture_output=True, text=True, check=True
        )
        for arg in command.args:
            assert not arg.startswith("-") or arg.split("=")[0] in shown.stdout, (
                f"{command}: {arg} is no option"
            )
        return
    config_dir, config_name = prepare_script(command.script)
    overrides = overrides_of(command)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except MissingConfigException as e:
        if command.script == "jobs/nightly.py" and config_name in str(e):
            pytest.skip(f"conf for jobs/nightly.py ({config_name}) does not exist yet: {e}")
        raise
    job_keys = {f.name for f in fields(JobConfig)}
    if set(cfg.keys()) == job_keys:
        to_job_config(cfg)  # values that types cannot check (ranges, cluster.address with cluster=ray, ...)
    elif job_keys <= set(cfg.keys()):  # a job with more groups (nightly.*): validate the generation part
        to_job_config(OmegaConf.masked_copy(cfg, sorted(job_keys)))
    if "cluster=ray" in overrides and "output=s3" in overrides:  # a real cluster (not the loopback trial)
        assert OmegaConf.select(cfg, "cluster.num_gpus_per_worker") == 1, (
            f"{command}: pass cluster.num_gpus_per_worker=1 (null counts GPUs at start, 0 before workers are up)"
        )


def help_commands() -> list[Command]:
    """The examples of the jobs' --help (the header and footer in conf/*.yaml), but the usage line with its
    [group=option ...] placeholders."""
    found = []
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        for command in commands_in_text(path.read_text(), rel(path), comments_only=False):
            if command.script in ("jobs/generate.py", "jobs/nightly.py") and not any(
                a.startswith("[") for a in command.args
            ):
                found.append(command)
    return found


@pytest.mark.parametrize("command", help_commands(), ids=str)
def test_every_help_example_composes_and_asks_for_a_gpu_per_worker_on_a_cluster(command: Command):
    test_every_command_is_a_script_of_the_project_with_overrides_that_compose(command)


# A GPU worker of the launcher config that starts from none is ready for an actor only after EC2 boots it,
# the image is pulled, setup_commands install torch's CUDA build and the actor downloads its model (~52 GB):
# far beyond cluster.worker_start_timeout_s's default (600 s), after which the driver exits 2.
COLD_GPU_WORKER_START_S = 1800


def test_jobs_for_the_autoscaled_launcher_cluster_wait_for_cold_gpu_workers():
    config = launcher_config()
    head = config["head_node_type"]
    cold = [
        n for n, t in config["available_node_types"].items() if n != head and t.get("min_workers", 0) == 0
    ]
    if not cold:
        pytest.skip("no GPU worker type starts from zero")
    commands = [
        c
        for c in all_commands()
        if c.where.startswith("infra/ray/cluster-aws.yaml") and "cluster=ray" in overrides_of(c)
    ]
    assert commands, "cluster-aws.yaml shows how to submit a job"
    for command in commands:
        config_dir, config_name = prepare_script(command.script)
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides_of(command))
        timeout = OmegaConf.select(cfg, "cluster.worker_start_timeout_s")
        assert timeout >= COLD_GPU_WORKER_START_S, (
            f"{command}: {cold} start from zero nodes; cluster.worker_start_timeout_s={timeout:g} gives up first"
        )


# ------------------------------------------------------------------------------------------------- IAM
def statements(policy: dict) -> dict[str, dict]:
    return {s["Sid"]: s for s in policy["Statement"]}


def test_the_policy_file_is_the_renderers_template():
    on_disk = json.loads((INFRA / "iam" / "output-prefix-policy.json").read_text())
    assert on_disk == render_policy.template(), "regenerate: python infra/iam/render_policy.py --template"


def test_the_policy_template_is_least_privilege():
    policy = json.loads((INFRA / "iam" / "output-prefix-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and statement["Action"] and statement["Resource"]
        actions = render_policy.as_list(statement["Action"])
        resources = render_policy.as_list(statement["Resource"])
        assert "s3:*" not in actions and "*" not in actions
        assert "*" not in resources
    by_sid = statements(policy)
    listing = by_sid["ListRunPrefixes"]
    assert listing["Resource"] == "arn:aws:s3:::<YOUR_BUCKET>"
    assert set(listing["Condition"]["StringLike"]["s3:prefix"]) == {
        f"<YOUR_{p}_PREFIX>{s}" for p in ("OUTPUT", "INPUT", "MODEL") for s in ("", "/*")
    }
    assert by_sid["ReadWriteOutputPrefix"]["Resource"] == "arn:aws:s3:::<YOUR_BUCKET>/<YOUR_OUTPUT_PREFIX>/*"
    assert set(by_sid["ReadWriteOutputPrefix"]["Action"]) == {
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
    }
    for sid in ("ReadInputPrefix", "ReadModelPrefix"):
        assert by_sid[sid]["Action"] == "s3:GetObject", f"{sid} is read-only"


def test_the_rendered_policy_names_the_real_prefixes_and_passes_its_checks():
    policy = render_policy.build_policy(
        "example-bucket",
        "/canvasflow/runs/",
        ["inputs/prompts.jsonl"],
        ["s3://model-bucket/models/dg-26b"],
        kms_key_arns=["arn:aws:kms:us-east-2:000000000000:key/00000000-0000-0000-0000-000000000000"],
        ray_autoscaler_worker_role_arn="arn:aws:iam::000000000000:role/canvasflow-ray-worker",
    )
    render_policy.check_policy(policy)
    by_sid = statements(policy)
    assert by_sid["ListRunPrefixes1"]["Resource"] == "arn:aws:s3:::example-bucket"
    assert by_sid["ListRunPrefixes1"]["Condition"]["StringLike"]["s3:prefix"] == [
        "canvasflow/runs",
        "canvasflow/runs/*",
        "inputs/prompts.jsonl",
        "inputs/prompts.jsonl/*",
    ]
    assert by_sid["ListRunPrefixes2"]["Resource"] == "arn:aws:s3:::model-bucket"
    assert by_sid["ReadWriteOutputPrefix"]["Resource"] == "arn:aws:s3:::example-bucket/canvasflow/runs/*"
    assert "arn:aws:s3:::example-bucket/inputs/prompts.jsonl" in by_sid["ReadInputPrefix"]["Resource"]
    assert by_sid["ReadModelPrefix"]["Resource"] == ["arn:aws:s3:::model-bucket/models/dg-26b/*"]
    manage = by_sid["RayAutoscalerManageClusterNodes"]
    cluster_name = launcher_config()["cluster_name"]
    assert manage["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == cluster_name
    for statement in policy["Statement"]:  # nothing but the autoscaler's EC2 describe/launch on '*'
        if statement["Resource"] == "*":
            assert all(a.startswith("ec2:") for a in render_policy.as_list(statement["Action"])), statement


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bucket", "My_Bucket", "--output-prefix", "runs"], "not an S3 bucket name"),
        (["--bucket", "192.168.1.1", "--output-prefix", "runs"], "IP address"),
        (["--bucket", "ok-bucket", "--output-prefix", "runs/*"], "wildcard"),
        (["--bucket", "ok-bucket", "--output-prefix", "a/../b"], "'..'"),
        (["--bucket", "ok-bucket", "--output-prefix", "/"], "give a prefix"),
        (["--bucket", "ok-bucket", "--output-prefix", "r", "--kms-key-arn", "key"], "not a KMS key ARN"),
        (
            ["--bucket", "ok-bucket", "--output-prefix", "r", "--ray-autoscaler-worker-role-arn", "x"],
            "role ARN",
        ),
    ],
)
def test_render_policy_rejects_bad_arguments_naming_them(args, message, capsys):
    assert render_policy.main(args) == 2
    assert message in capsys.readouterr().err


def test_render_policy_cli_prints_json(capsys):
    assert render_policy.main(["--bucket", "b-1", "--output-prefix", "runs", "--input-prefix", "in"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert {s["Sid"] for s in policy["Statement"]} == {
        "ListRunPrefixes",
        "ReadWriteOutputPrefix",
        "ReadInputPrefix",
    }


def test_check_policy_refuses_what_least_privilege_forbids():
    base = render_policy.build_policy("b-1", "runs")
    for mutate, message in [
        (lambda s: s[1].update(Action="s3:*"), "wildcard action"),
        (lambda s: s[1].update(Resource="*"), "Resource '*'"),
        (lambda s: s[1].update(Resource="arn:aws:s3:::b-1/*"), "limited to objects under a prefix"),
        (lambda s: s[0].pop("Condition"), "s3:prefix condition"),
    ]:
        policy = json.loads(json.dumps(base))
        mutate(policy["Statement"])
        with pytest.raises(render_policy.PolicyError, match=re.escape(message)):
            render_policy.check_policy(policy)


# ---------------------------------------------------------------------------------------- placeholders
def documented_placeholders() -> set[str]:
    return set(PLACEHOLDER.findall((INFRA / "README.md").read_text()))


def test_every_user_filled_value_is_a_documented_placeholder():
    documented = documented_placeholders()
    for path in [
        *infra_files(".yaml", ".yml", ".json", ".sh", ".py", ".md"),
        *DOCS,
        INFRA / "docker" / "Dockerfile",
    ]:
        if not path.is_file():
            continue
        text = path.read_text()
        undocumented = set(PLACEHOLDER.findall(text)) - documented
        assert not undocumented, f"{rel(path)}: {sorted(undocumented)} missing from infra/README.md"
        # Look-alikes of real values that a user could miss: account ids, made-up ARNs, TODO markers.
        for account in re.findall(r"(?<![\w.-])(\d{12})(?![\w-])", text):
            assert set(account) == {"0"}, f"{rel(path)}: a real-looking account id {account}"
        assert not re.search(r"\b(REPLACE_?ME|CHANGEME|TODO|FIXME|XXX)\b", text), (
            f"{rel(path)}: unfilled marker"
        )


def test_placeholders_are_only_where_the_readme_says_users_fill_them():
    # A manifest that is not user-facing (the launcher, the policy renderer) carries none.
    for path in (KUBERAY / "nightly_launcher.py", INFRA / "install-deps.sh"):
        assert not PLACEHOLDER.search(path.read_text()), rel(path)


# ---------------------------------------------------------------------------------------------- shell
@pytest.mark.parametrize("path", infra_files(".sh"), ids=rel)
def test_shell_scripts_parse(path: Path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_install_deps_installs_pyproject_dependencies_with_the_pins_and_torchs_own_triton():
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(INFRA / "install-deps.sh")], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    requirements, rest = out.split("# constraints", 1)
    constraints, command = rest.split("# command:", 1)
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirements.split("\n", 1)[1].split() == declared
    assert f"ray=={constraint('ray')}" in constraints.split()
    assert not re.search(r"^triton==", constraints, re.MULTILINE), "torch's CUDA build pins its own triton"
    assert "torch==2.13.0" in command and "-c " in command and "-r " in command
