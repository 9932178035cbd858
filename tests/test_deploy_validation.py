"""deploy/ validated offline against real schemas and rules.

- the DaskJob against the dask-kubernetes CRD (vendored in deploy/schemas, strict: a field the
  API server would prune is an error), and the other manifests against the Kubernetes schemas
  of kubernetes-validate (test extra);
- Pod Security "restricted" for every pod, the NetworkPolicy by evaluating who may connect;
- the TLS configuration wired into every pod of the Dask cluster;
- docker-compose.yml against the vendored compose-spec schema; every command line against
  the real CLIs. Dockerfiles, images and pins: test_deploy_images.py.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test extra) not installed")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SCHEMAS = DEPLOY / "schemas"
CRDS = SCHEMAS / "dask-kubernetes-2026.3.0"
UID = 10001


def _docs(path: Path) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 0.3-0.5 MB
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d is not None]


def _manifests() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "operator-values.yaml"
            for d in _docs(p)]


def _daskjob() -> dict[str, Any]:
    (job,) = [d for d in _manifests() if d["kind"] == "DaskJob"]
    return job


def _pods() -> dict[str, tuple[dict[str, str], dict[str, Any]]]:
    """Every pod the manifests create: name -> (labels the operator gives it, PodSpec)."""
    job = _daskjob()
    name = job["metadata"]["name"]
    cl = job["spec"]["cluster"]["spec"]
    pods = {role: ({"dask.org/cluster-name": name, "dask.org/component": role}, spec)
            for role, spec in (("job-runner", job["spec"]["job"]["spec"]),
                               ("scheduler", cl["scheduler"]["spec"]),
                               ("worker", cl["worker"]["spec"]))}
    (cj,) = [d for d in _manifests() if d["kind"] == "CronJob"]
    tmpl = cj["spec"]["jobTemplate"]["spec"]["template"]
    pods["launcher"] = (tmpl["metadata"]["labels"], tmpl["spec"])
    return pods


# --- the dask-kubernetes CRDs -------------------------------------------------------------------

def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An openAPIV3Schema as JSON Schema in which unknown fields are errors, not pruned."""
    s = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node["type"] = ["integer", "string"]
            if (node.get("type") == "object" and "properties" in node
                    and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    s["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                            "metadata": {"type": "object"}})
    return s


@functools.cache
def _crd_validator(kind: str) -> Any:
    (crd,) = _docs(CRDS / f"{kind.lower()}.yaml")
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def _errors(validator: Any, doc: Any) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_daskjob_matches_the_dask_kubernetes_crd() -> None:
    assert _errors(_crd_validator("DaskJob"), _daskjob()) == []


def test_crd_check_refuses_integer_quantities_and_fields_the_server_would_prune() -> None:
    bad = copy.deepcopy(_daskjob())
    worker = bad["spec"]["cluster"]["spec"]["worker"]["spec"]
    worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = 1
    worker["securityContext"] = {**worker["securityContext"],
                                 "appArmorProfile": {"type": "RuntimeDefault"}}
    errors = _errors(_crd_validator("DaskJob"), bad)
    assert any("nvidia.com/gpu: 1 is not of type 'string'" in e for e in errors), errors
    assert any("'appArmorProfile' was unexpected" in e for e in errors), errors


def test_kubernetes_profile_resources_match_the_daskcluster_crd() -> None:
    from semdask.cluster.profiles import profile_config

    schema = _crd_validator("DaskCluster").schema
    worker = schema["properties"]["spec"]["properties"]["worker"]["properties"]["spec"]
    resources = worker["properties"]["containers"]["items"]["properties"]["resources"]
    v = jsonschema.Draft7Validator(resources)
    cfg = profile_config("kubernetes")
    for res in (cfg["resources"], cfg["gpu-worker-group"]["resources"]):
        assert _errors(v, res) == []
    assert _errors(v, {"limits": {"nvidia.com/gpu": 1}})  # the check can fail


# --- Kubernetes built-in kinds ---------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_builtin_kinds_match_the_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate (test extra) not installed")
    docs = [d for d in _manifests() if d["kind"] != "DaskJob"]
    assert {d["kind"] for d in docs} >= {"CronJob", "NetworkPolicy", "PersistentVolumeClaim",
                                         "Role", "RoleBinding", "ServiceAccount"}
    for d in docs:
        kv.validate(d, version, strict=True)
    # the DaskJob's pod specs against today's PodSpec as well
    for role, (labels, spec) in _pods().items():
        kv.validate({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": role, "labels": labels}, "spec": spec},
                    version, strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "x"},
                     "spec": {"schedule": 1}}, version, strict=True)


# --- Pod Security "restricted" (Kubernetes Pod Security Standards) --------------------------

_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
            "projected", "secret"}


def _restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The rules of the baseline and restricted Pod Security Standards that ``spec`` breaks."""
    out = []
    psc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(host)
    out += [f"volume {v['name']}: type not allowed" for v in spec.get("volumes", [])
            if not set(v) - {"name"} <= _VOLUMES]
    if psc.get("sysctls"):
        out.append("pod sysctls")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities added")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out


@pytest.mark.parametrize("pod", ["job-runner", "scheduler", "worker", "launcher"])
def test_every_pod_passes_pod_security_restricted(pod: str) -> None:
    _, spec = _pods()[pod]
    assert _restricted_violations(spec) == []
    for c in spec["containers"]:  # hardening beyond the profile
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}


def test_restricted_check_flags_an_unhardened_pod() -> None:
    spec = {"hostNetwork": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
            "containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True}}]}
    found = " ".join(_restricted_violations(spec))
    for rule in ("hostNetwork", "type not allowed", "privileged", "allowPrivilegeEscalation",
                 "drop ALL", "runAsNonRoot", "seccompProfile"):
        assert rule in found, rule


def test_pods_run_as_the_image_user_and_own_the_shared_volume() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        users = re.findall(r"^USER (\S+)$", (DEPLOY / name).read_text(), re.M)
        assert users[-1] == f"{UID}:{UID}", name
    for role, (_, spec) in _pods().items():
        psc = spec["securityContext"]
        assert (psc["runAsUser"], psc["runAsGroup"]) == (UID, UID), role
        if any("persistentVolumeClaim" in v for v in spec.get("volumes", [])):
            assert psc["fsGroup"] == UID, role  # group-writable RWX volume
        if role != "launcher":  # only the launcher talks to the API server
            assert spec["automountServiceAccountToken"] is False, role


# --- NetworkPolicy: who may connect to whom ----------------------------------------------------

def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions: extend this evaluator"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _allowed(src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    """Whether the policies admit TCP from pod ``src`` to ``dst:port`` (same namespace)."""
    policies = [d["spec"] for d in _manifests() if d["kind"] == "NetworkPolicy"]
    selecting = [p for p in policies
                 if _selects(p["podSelector"], dst) and "Ingress" in p["policyTypes"]]
    if not selecting:
        return True
    for p in selecting:
        for rule in p.get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            assert all(set(peer) == {"podSelector"} for peer in peers or [])
            if ((peers is None or any(_selects(peer["podSelector"], src) for peer in peers))
                    and (ports is None or any(q["port"] == port and q.get("protocol", "TCP")
                                              == "TCP" for q in ports))):
                return True
    return False


def test_network_policy_admits_only_the_cluster_itself() -> None:
    pods = {role: labels for role, (labels, _) in _pods().items()}
    sched, worker, runner = pods["scheduler"], pods["worker"], pods["job-runner"]
    stranger = {"app": "something-else"}
    other_cluster = {"dask.org/cluster-name": "other", "dask.org/component": "worker"}
    assert _allowed(worker, sched, 8786) and _allowed(runner, sched, 8786)
    assert _allowed(sched, worker, 40123) and _allowed(worker, worker, 40123)
    assert not _allowed(stranger, sched, 8786) and not _allowed(other_cluster, sched, 8786)
    assert not _allowed(worker, sched, 8787)  # no dashboard from the network
    assert not _allowed(stranger, worker, 40123) and not _allowed(pods["launcher"], sched, 8786)
    assert not _allowed(stranger, runner, 8080)


# --- TLS wired into every pod of the Dask cluster ----------------------------------------------

def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_tls_config_and_certificates_reach_every_dask_pod() -> None:
    tls = yaml.safe_load((DEPLOY / "tls" / "dask-tls.yaml").read_text())["distributed"]["comm"]
    assert tls["require-encryption"] is True
    job = _daskjob()
    service = job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert [p["port"] for p in service["ports"]] == [8786]
    address = f"tls://{job['metadata']['name']}-scheduler:8786"
    role_of = {"scheduler": "scheduler", "worker": "worker", "job-runner": "client"}
    for pod, role in role_of.items():
        _, spec = _pods()[pod]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        env = _env(c)
        # DASK_CONFIG holds the ConfigMap made from deploy/tls/dask-tls.yaml
        assert mounts[env["DASK_CONFIG"]]["configMap"]["name"] == "semdask-dask-config", pod
        files = {}
        for path, vol in mounts.items():
            for item in (vol.get("secret") or {}).get("items", []):
                files[f"{path}/{item['path']}"] = item["key"]
        wanted = {tls["tls"]["ca-file"], tls["tls"][role]["cert"], tls["tls"][role]["key"]}
        assert set(files) == wanted, pod  # its own role's key only
        if role == "scheduler":
            assert c["args"][c["args"].index("--protocol") + 1] == "tls"
        else:
            assert env["DASK_SCHEDULER_ADDRESS"] == address, pod


# --- every command line parses with the real CLIs -------------------------------------------

def _parse(args: list[str]) -> None:
    """Parse ``args`` with the click command they name (nothing runs); raise if invalid."""
    from distributed.cli import dask_scheduler, dask_worker

    from semdask.cli.main import main as semdask_main

    if args[:2] == ["dask", "worker"]:
        dask_worker.main.make_context("dask worker", args[2:])
    elif args[:2] == ["dask", "scheduler"]:
        dask_scheduler.main.make_context("dask scheduler", args[2:])
    else:
        assert args[0] == "semdask", args
        i = next(i for i, a in enumerate(args[1:], 1) if not a.startswith("-"))
        ctx = semdask_main.make_context("semdask", args[1:i])
        cmd = semdask_main.get_command(ctx, args[i])
        assert cmd is not None, args[i]
        cmd.make_context(args[i], args[i + 1:], parent=ctx)


def test_container_commands_parse_with_the_real_clis() -> None:
    import click

    commands = []
    for _, spec in (v for k, v in _pods().items() if k != "launcher"):
        for c in spec["containers"]:
            env = {**_env(c), "DASK_SCHEDULER_ADDRESS": "tls://s:8786", "DASK_WORKER_NAME": "w"}
            commands.append([re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], a)
                             for a in c["args"]])
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    commands += [s["command"] for s in compose["services"].values()]
    assert {tuple(c[:2]) for c in commands} == {("dask", "worker"), ("dask", "scheduler"),
                                                ("semdask", "-v")}
    for args in commands:
        _parse(args)
    with pytest.raises(click.UsageError):
        _parse(["semdask", "segment", "m.ome.zarr", "--no-such-flag"])


# --- docker compose ----------------------------------------------------------------------------

def test_compose_file_matches_the_compose_spec() -> None:
    import json

    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    v = jsonschema.validators.validator_for(schema)(schema)
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    assert _errors(v, compose) == []
    bad = copy.deepcopy(compose)
    bad["services"]["job"]["restart_policy"] = "no"  # not a compose key
    assert _errors(v, bad)
