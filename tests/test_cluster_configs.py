"""The deployment files in cluster/ and jobs/configs/ parse, agree with each other, and would be accepted.

- Ray cluster launcher YAML: validated against the schema Ray itself ships (ray/autoscaler/ray-schema.json)
  before and after Ray fills in the AWS defaults, plus checks of our own (GPU worker type, bounds).
- KubeRay manifests: no package we can install offline carries the KubeRay CRDs, so they are checked
  against a hand-written subset of the ray.io/v1 CRD schema (required fields, types, known keys, the
  string-valued rayStartParams) and translated by Ray's own KubeRay autoscaler code, which validates its
  result and tells which Ray resources (CPU, GPU) each group offers.
- Job configs: every one loads with ``load_config``; none carries a secret.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO
from videoindex.config import load_config, output_affecting, redact, to_dict

CLUSTER = REPO / "cluster"
CONFIGS = REPO / "jobs" / "configs"
KUBERAY = ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _dockerfile_image() -> str:
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    assert match, "cluster/Dockerfile documents its image tag in a `docker build ... -t IMAGE .` comment"
    return match.group(1)


def _dockerfile(key: str) -> str:
    match = re.search(rf"^{key}[ =](\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"cluster/Dockerfile has no {key}"
    return match.group(1)


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [("kuberay-raycluster.yaml", _load(CLUSTER / "kuberay-raycluster.yaml")["spec"])]
    specs.append(("kuberay-rayjob.yaml", _load(CLUSTER / "kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]))
    return specs


def _containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def test_every_yaml_parses():
    paths = sorted(CLUSTER.glob("*.yaml")) + sorted(CONFIGS.glob("*.yaml"))
    assert {p.name for p in paths} >= {"ray-cluster.yaml", *KUBERAY, "local_demo.yaml", "s3_gpu_cluster.yaml"}
    for path in paths:
        assert isinstance(_load(path), dict), path


# --- Ray cluster launcher ----------------------------------------------------------------------------------


def test_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(CLUSTER / "ray-cluster.yaml")
    validate_config(copy.deepcopy(config))
    filled = prepare_config(copy.deepcopy(config))  # merges the AWS provider's defaults, as `ray up` does
    validate_config(filled)
    assert set(filled["available_node_types"]) == set(config["available_node_types"])


def test_launcher_config_has_a_cpu_head_and_autoscaled_gpu_workers():
    config = _load(CLUSTER / "ray-cluster.yaml")
    assert config["cluster_name"] and config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_workers, "a worker type must declare resources: {GPU: >0}"
    for t in workers.values():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= config["max_workers"]
        assert t["resources"].get("CPU", 0) > 0
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= config["max_workers"]
    assert config["max_workers"] == sum(t["max_workers"] for t in workers.values())
    assert 0 < config["max_workers"] <= 200
    assert config["docker"]["image"] == _dockerfile_image()
    head_start = " ".join(config["head_start_ray_commands"])
    assert (
        "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    )
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


# --- KubeRay -------------------------------------------------------------------------------------------------

QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+([KMGTPE]i|[mkMGTPE])?$"}]}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "workingDir": {"type": "string"},
        "resources": {
            "type": "object",
            "properties": {
                "limits": {"type": "object", "additionalProperties": QUANTITY},
                "requests": {"type": "object", "additionalProperties": QUANTITY},
            },
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}},
        }
    },
}
# The CRD types rayStartParams as map[string]string: `num-cpus: 0` is rejected, `num-cpus: "0"` is not.
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "enableIngress": {"type": "boolean"},
        "headService": {"type": "object"},
        "rayStartParams": RAY_START_PARAMS,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "template": POD_TEMPLATE,
    },
}
WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": RAY_START_PARAMS,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
        "template": POD_TEMPLATE,
    },
}
RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec", "workerGroupSpecs"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
            },
        },
        "gcsFaultToleranceOptions": {"type": "object"},
        "headServiceAnnotations": {"type": "object"},
        "managedBy": {"type": "string"},
        "suspend": {"type": "boolean"},
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": WORKER_GROUP},
    },
}
OBJECT_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SUBSET = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": OBJECT_META,
            "spec": RAY_CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": OBJECT_META,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "additionalProperties": False,
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "rayClusterSpec": RAY_CLUSTER_SPEC,
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                    "runtimeEnvYAML": {"type": "string"},
                    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                    "entrypointNumCpus": {"type": "number"},
                    "entrypointNumGpus": {"type": "number"},
                    "jobId": {"type": "string"},
                    "clusterSelector": {"type": "object"},
                    "submitterPodTemplate": {"type": "object"},
                    "suspend": {"type": "boolean"},
                    "managedBy": {"type": "string"},
                },
            },
        },
    },
}


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_matches_the_crd_subset(name):
    manifest = _load(CLUSTER / name)
    assert manifest["kind"] in CRD_SUBSET
    jsonschema.validate(manifest, CRD_SUBSET[manifest["kind"]])


def test_the_crd_subset_catches_the_usual_mistakes():
    manifest = _load(CLUSTER / "kuberay-rayjob.yaml")
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # not a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SUBSET["RayJob"])
    broken = copy.deepcopy(manifest)
    broken["spec"]["shutdownAfterJobFinish"] = True  # typo: the API server would reject the field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CRD_SUBSET["RayJob"])


@pytest.mark.parametrize(("name", "spec"), _cluster_specs(), ids=KUBERAY)
def test_kuberay_groups_give_ray_gpus_as_rays_autoscaler_reads_them(name, spec):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    config = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "t", "namespace": "default"}, "spec": spec}
    )
    types = config["available_node_types"]
    head = types.pop("headgroup")
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # head: driver only
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), f"{name}: no GPU worker group"
    for t in types.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]


@pytest.mark.parametrize(("name", "spec"), _cluster_specs(), ids=KUBERAY)
def test_kuberay_pods_run_the_documented_image(name, spec):
    image = _dockerfile_image()
    assert spec["rayVersion"] == _dockerfile("ARG RAY_IMAGE").split(":")[1].split("-")[0]
    assert f"ray{spec['rayVersion']}" in image
    for group, container in _containers(spec):
        assert container["image"] == image, f"{name} {group}"
        assert container["workingDir"] == _dockerfile("WORKDIR"), f"{name} {group}"
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        if "nvidia.com/gpu" in requests:  # extended resources: requests may only repeat the limit
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]  # fmt: skip
    assert gpu_groups, f"{name}: no worker group asks for nvidia.com/gpu"


def test_rayjob_entrypoint_names_files_of_this_repo():
    spec = _load(CLUSTER / "kuberay-rayjob.yaml")["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and (REPO / words[1]).is_file()
    assert words[1] == "jobs/index_job.py" and (REPO / words[2]).is_file()
    load_config(str(REPO / words[2]))
    assert spec["shutdownAfterJobFinishes"] is True


def test_readme_and_dockerfile_document_the_same_image():
    image = _dockerfile_image()
    readme = (CLUSTER / "README.md").read_text()
    assert image in readme
    assert _dockerfile("FROM") == "${RAY_IMAGE}" and "rayproject/ray:" in _dockerfile("ARG RAY_IMAGE")
    for name in ("ray-cluster.yaml", *KUBERAY):
        assert f"cluster/{name}" in readme
    assert "cores_per_gpu = model_clips_per_s_per_gpu x decode_cpu_s_per_clip" in readme


def test_dockerfile_sets_the_worker_pool_settings_of_a_local_run():
    """Every node runs the image, so its raylet gets the settings videoindex gives a local Ray."""
    from videoindex.executors.ray_executor import ray_node_env

    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    env = dict(re.findall(r"(RAY_\w+)=(\S+)", " ".join(re.findall(r"^ENV (.+)$", text, re.MULTILINE))))
    assert env == ray_node_env()


# --- job configs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_job_config_loads_and_holds_no_secret(path):
    config = load_config(str(path))
    for options in (config.input.storage_options, config.output.storage_options):
        assert redact(options) == dict(options), f"{path.name}: credentials belong in the environment"


def test_local_demo_config_runs_the_bundled_samples_on_cpu():
    config = load_config(str(CONFIGS / "local_demo.yaml"))
    assert (REPO / config.input.uri).is_dir() and Path(config.output.uri).is_absolute()
    assert (
        config.model.random_weights and config.execution.actor_num_gpus == 0 and config.execution.actors == 1
    )


def test_gpu_config_uses_gpu_actors_and_resume_config_continues_it():
    job = load_config(str(CONFIGS / "s3_gpu_cluster.yaml"))
    assert job.input.uri.startswith("s3://") and job.output.uri.startswith("s3://")
    assert (
        job.execution.actors is None and job.execution.actor_num_gpus == 1 and job.model.dtype == "bfloat16"
    )
    resume = load_config(str(CONFIGS / "resume_failed.yaml"))
    # The job refuses to continue an output with other output-affecting settings.
    assert output_affecting(to_dict(resume)) == output_affecting(to_dict(job))
    assert resume.output.uri == job.output.uri
