"""k8s/ rendered by ``kubectl kustomize``, validated against the Kubernetes 1.30 schemas, then checked rule by rule."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from chashd.config import GatewayConfig, KVStoreConfig, check_secrets, load_config, option_specs
from tests.deploy.conftest import ROOT, tool

NAMESPACE = "consistent-hashing"
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    """Every object of ``kubectl kustomize k8s/``."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(ROOT / "k8s")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def get(docs: list[Doc], kind: str, name: str) -> Doc:
    """The one object of ``kind`` named ``name``."""
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def workloads(docs: list[Doc]) -> list[Doc]:
    """The Deployments and StatefulSets."""
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container and init container."""
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield workload, container


def env_of(container: Doc) -> dict[str, Doc]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


def matches(selector: Doc, labels: dict[str, str]) -> bool:
    """Does a label selector (matchLabels only, as used here) select ``labels``?"""
    assert set(selector) <= {"matchLabels"}, f"selector type not understood by this test: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(docs: list[Doc], name: str) -> dict[str, str]:
    """The pod template labels of workload ``name``."""
    (workload,) = [w for w in workloads(docs) if w["metadata"]["name"] == name]
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


class SchemaTests:
    """Every object is valid Kubernetes 1.30, strictly (no unknown or misspelled field)."""

    def test_every_object_validates(self, docs: list[Doc]) -> None:
        """kubernetes-validate's Python API, strict, version 1.30.0, has a schema for and accepts every object."""
        for doc in docs:
            assert kubernetes_validate.validate(doc, "1.30.0", strict=True) == "1.30", doc["metadata"]["name"]

    def test_strict_catches_a_misspelling(self, docs: list[Doc]) -> None:
        """The same validation refuses a misspelled field (so the test above can fail)."""
        broken = yaml.safe_load(yaml.safe_dump(get(docs, "Deployment", "kvstore")))
        broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, "1.30.0", strict=True)

    def test_objects(self, docs: list[Doc]) -> None:
        """The objects the issue asks for, all in the namespace consistent-hashing."""
        assert {(d["kind"], d["metadata"]["name"]) for d in docs} == {
            ("Namespace", NAMESPACE),
            ("ServiceAccount", "gateway"),
            ("ServiceAccount", "kvstore"),
            ("Service", "gateway-headless"),
            ("Service", "gateway-service"),
            ("Service", "kvstore"),
            ("StatefulSet", "gateway"),
            ("Deployment", "kvstore"),
            ("HorizontalPodAutoscaler", "kvstore"),
            ("PodDisruptionBudget", "gateway"),
            ("PodDisruptionBudget", "kvstore"),
            ("NetworkPolicy", "default-deny-ingress"),
            ("NetworkPolicy", "gateway"),
            ("NetworkPolicy", "kvstore"),
            ("ServiceAccount", "gateway-follower"),
            ("Service", "gateway-follower"),
            ("Deployment", "gateway-follower"),
            ("HorizontalPodAutoscaler", "gateway-follower"),
            ("PodDisruptionBudget", "gateway-follower"),
            ("NetworkPolicy", "gateway-follower"),
        }
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]

    def test_namespace_enforces_restricted(self, docs: list[Doc]) -> None:
        """The namespace enforces the restricted Pod Security Standard, which these pods meet."""
        labels = get(docs, "Namespace", NAMESPACE)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


class KustomizationTests:
    """kustomization.yaml."""

    def test_labels_not_in_selectors(self, docs: list[Doc]) -> None:
        """Common labels use ``labels:`` with includeSelectors false: on every object, in no selector."""
        kustomization = yaml.safe_load((ROOT / "k8s" / "kustomization.yaml").read_text())
        assert "commonLabels" not in kustomization
        (labels,) = kustomization["labels"]
        assert labels["includeSelectors"] is False
        for doc in docs:
            for key, value in labels["pairs"].items():
                assert doc["metadata"]["labels"][key] == value
        for workload in workloads(docs):
            assert "app.kubernetes.io/part-of" not in workload["spec"]["selector"]["matchLabels"]
        for service in (d for d in docs if d["kind"] == "Service"):
            assert "app.kubernetes.io/part-of" not in service["spec"]["selector"]

    def test_image(self, docs: list[Doc]) -> None:
        """Both roles run the one image, chashd, pulled only when missing (kind/minikube load it)."""
        for _, container in containers(docs):
            assert container["image"] == "chashd:latest"
            assert container["imagePullPolicy"] == "IfNotPresent"


class ContainerTests:
    """Probes, resources and securityContext of every container."""

    def test_probes(self, docs: list[Doc]) -> None:
        """Startup and liveness probe /health, readiness probes /ready, all on a declared HTTP port."""
        for workload, container in containers(docs):
            ports = {p["name"] for p in container["ports"]}
            expected = (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready"))
            for probe, path in expected:
                spec = container[probe]["httpGet"]
                assert spec["path"] == path, (workload["metadata"]["name"], probe)
                assert spec["port"] in ports
            # the startup probe gives the daemon at least a minute before liveness may kill it
            startup = container["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 60

    @staticmethod
    def _quantity(value: str | int) -> float:
        units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
        number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
        return float(number) * units[unit]

    def test_resources(self, docs: list[Doc]) -> None:
        """Every container requests and limits CPU and memory, requests not above limits."""
        for _, container in containers(docs):
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            for resource in ("cpu", "memory"):
                assert self._quantity(requests[resource]) <= self._quantity(limits[resource])

    def test_security_context(self, docs: list[Doc]) -> None:
        """Non-root (the image's uid), read-only root, no privilege escalation, no capabilities, RuntimeDefault."""
        (uid,) = re.findall(r"^ARG CHASHD_UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
        for workload, container in containers(docs):
            pod = workload["spec"]["template"]["spec"]["securityContext"]
            ctx = container["securityContext"]
            assert ctx["runAsNonRoot"] is True and pod["runAsNonRoot"] is True
            assert ctx["runAsUser"] == pod["runAsUser"] == int(uid)
            assert pod["fsGroup"] == int(uid)
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"} == pod["seccompProfile"]

    def test_writable_paths(self, docs: list[Doc]) -> None:
        """With a read-only root, /tmp and the data directory (CHASHD_DATA_DIR) are volumes; a follower keeps
        no data."""
        for workload, container in containers(docs):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts
            if workload["metadata"]["name"] == "gateway-follower":
                assert "CHASHD_DATA_DIR" not in env_of(container)
                continue
            assert env_of(container)["CHASHD_DATA_DIR"]["value"] in mounts, workload["metadata"]["name"]

    def test_known_options(self, docs: list[Doc]) -> None:
        """Every CHASHD_* or short-named variable a container sets is an option of its role (no misspelled name)."""
        roles = {"gateway": GatewayConfig, "gateway-follower": GatewayConfig, "kvstore": KVStoreConfig}
        for workload, container in containers(docs):
            known = {var for spec in option_specs(roles[workload["metadata"]["name"]]) for var in spec.env}
            for name in env_of(container):
                if name.startswith("CHASHD_") or name in ("LISTEN_PORT", "RAFT_PORT", "NODE_ID", "GATEWAY_ADDRESS"):
                    assert name in known, name

    def test_no_service_links(self, docs: list[Doc]) -> None:
        """No service environment variables (a Service named like an option would inject CHASHD_* values)."""
        for workload in workloads(docs):
            assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False


class ServiceAccountTests:
    """Each role has its own ServiceAccount, and no token is mounted."""

    def test_service_accounts(self, docs: list[Doc]) -> None:
        """automountServiceAccountToken is false on the accounts and on the pods that use them."""
        for workload in workloads(docs):
            spec = workload["spec"]["template"]["spec"]
            account = get(docs, "ServiceAccount", spec["serviceAccountName"])
            assert account["automountServiceAccountToken"] is False
            assert spec["automountServiceAccountToken"] is False


class GatewayTests:
    """The gateway StatefulSet and its Services."""

    def test_statefulset(self, docs: list[Doc]) -> None:
        """3 replicas started in parallel, a PVC for the Raft state mounted at the data directory."""
        sts = get(docs, "StatefulSet", "gateway")
        assert sts["spec"]["replicas"] == 3
        assert sts["spec"]["podManagementPolicy"] == "Parallel"
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts[claim["metadata"]["name"]] == env_of(container)["CHASHD_DATA_DIR"]["value"]
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    def test_services(self, docs: list[Doc]) -> None:
        """A headless Service publishing not-ready pods (the StatefulSet's), and a LoadBalancer for clients."""
        sts = get(docs, "StatefulSet", "gateway")
        labels = pod_labels(docs, "gateway")
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        headless = get(docs, "Service", sts["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert headless["spec"]["publishNotReadyAddresses"] is True
        clients = get(docs, "Service", "gateway-service")
        assert clients["spec"]["type"] == "LoadBalancer"
        assert {(p["port"], container_ports[p["targetPort"]]) for p in clients["spec"]["ports"]} == {
            (8000, 8000),
            (11211, 11211),
        }
        for service in (headless, clients):
            assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        assert container_ports == {"http": 8000, "raft": 8001, "memcache": 11211}

    def test_termination_grace(self, docs: list[Doc]) -> None:
        """Gateways get time to stop cleanly."""
        assert get(docs, "StatefulSet", "gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30


def run_gateway_script(
    docs: list[Doc], tmp_path: Path, pod: str, replicas: int | None = None, resolves: bool = True
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run the gateway container's command with /bin/sh as the kubelet would, with stand-in twistd/getent/sleep.

    Returns the shell's result and what the stand-in twistd received (argv and its environment), or None.
    """
    sts = get(docs, "StatefulSet", "gateway")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    field_values = {"metadata.name": pod, "metadata.namespace": sts["metadata"]["namespace"], "status.podIP": "1.2.3.4"}
    env: dict[str, str] = {}
    for entry in container["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "fieldRef" in entry["valueFrom"]:
            env[entry["name"]] = field_values[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = "secret-" + entry["valueFrom"]["secretKeyRef"]["key"]
    if replicas is not None:
        env["GATEWAY_REPLICAS"] = str(replicas)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "twistd.yaml"
    (bin_dir / "twistd").write_text(
        f'#!/bin/sh\n{{ echo "argv: [$(printf \'"%s", \' "$@")]"; echo "peers: \\"$PEER_GATEWAYS\\""; }} > {record}\n'
    )
    (bin_dir / "getent").write_text(f"#!/bin/sh\nexit {0 if resolves else 2}\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")
    for name in ("twistd", "getent", "sleep"):
        (bin_dir / name).chmod(0o755)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    command = container["command"] + container["args"]
    assert command[:2] == ["/bin/sh", "-c"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    received = yaml.safe_load(record.read_text()) if record.exists() else None
    if received is not None:
        received["env"] = env
    return result, received


class GatewayPeerTests:
    """Each gateway builds its Raft peers from its own pod name and the replica count."""

    def test_no_kubernetes_expansion(self, docs: list[Doc]) -> None:
        """The script has no $(NAME) reference, which Kubernetes would expand before the shell runs."""
        (container,) = get(docs, "StatefulSet", "gateway")["spec"]["template"]["spec"]["containers"]
        for text in container["args"]:
            assert not re.search(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", text)

    def test_replica_count_matches(self, docs: list[Doc]) -> None:
        """GATEWAY_REPLICAS, from which the peers are built, equals the StatefulSet's replicas."""
        sts = get(docs, "StatefulSet", "gateway")
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert int(env_of(container)["GATEWAY_REPLICAS"]["value"]) == sts["spec"]["replicas"]

    @pytest.mark.parametrize("pod", ["gateway-0", "gateway-1", "gateway-2"])
    def test_peers(self, docs: list[Doc], tmp_path: Path, pod: str) -> None:
        """gateway-N gets the other ordinals' stable names as peers and advertises its own."""
        result, received = run_gateway_script(docs, tmp_path, pod)
        assert result.returncode == 0, result.stderr
        assert received is not None
        domain = f"gateway-headless.{NAMESPACE}.svc"
        others = [f"gateway-{i}.{domain}:8001" for i in range(3) if f"gateway-{i}" != pod]
        assert received["peers"].split(",") == others
        argv = received["argv"]
        assert argv[:4] == ["--nodaemon", "--pidfile=", "chash-gateway", "--gateway-id"]
        cli = {"gateway_id": argv[4], "advertise_host": argv[argv.index("--advertise-host") + 1]}
        assert cli == {"gateway_id": pod, "advertise_host": f"{pod}.{domain}"}
        # the daemon's own loader accepts the result
        environ = {**received["env"], "PEER_GATEWAYS": received["peers"]}
        config = load_config(GatewayConfig, cli=cli, environ=environ)
        assert config.peers == tuple(others)
        assert config.raft_port == 8001 and config.port == "tcp:8000" and config.line_port == "tcp:11211"
        assert config.raft_password == "secret-raft-password" and config.token == "secret-token"
        check_secrets(config)  # it would start: both secrets come from the Secret
        assert config.data_dir == "/var/lib/chashd"

    def test_five_replicas(self, docs: list[Doc], tmp_path: Path) -> None:
        """With GATEWAY_REPLICAS=5, gateway-4 has the four others as peers."""
        result, received = run_gateway_script(docs, tmp_path, "gateway-4", replicas=5)
        assert result.returncode == 0, result.stderr
        assert received is not None
        assert [p.split(".")[0] for p in received["peers"].split(",")] == [f"gateway-{i}" for i in range(4)]

    def test_waits_for_dns(self, docs: list[Doc], tmp_path: Path) -> None:
        """A pod whose own name never resolves gives up with a clear message instead of starting Raft."""
        result, received = run_gateway_script(docs, tmp_path, "gateway-0", resolves=False)
        assert result.returncode == 1
        assert "does not resolve" in result.stderr
        assert received is None


class KVStoreTests:
    """The kvstore Deployment, its Service and HPA."""

    def test_identity(self, docs: list[Doc]) -> None:
        """NODE_ID is the pod name, the advertised host its pod IP, and it registers with a gateway Service."""
        (container,) = get(docs, "Deployment", "kvstore")["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        assert env["NODE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["CHASHD_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        host, port = env["GATEWAY_ADDRESS"]["value"].split(":")
        service = get(docs, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(docs, "gateway"))
        assert container["command"] == ["twistd", "--nodaemon", "--pidfile=", "chash-kvstore"]
        environ = {k: e["value"] for k, e in env.items() if "value" in e}
        assert env["CHASHD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "chashd-secrets", "key": "token"}
        environ.update(NODE_ID="kvstore-5d8f7-abcde", CHASHD_ADVERTISE_HOST="1.2.3.4", CHASHD_TOKEN="t")
        config = load_config(KVStoreConfig, environ=environ)
        check_secrets(config)  # it would start: the token comes from the Secret
        assert config.port == "tcp:8080" and config.line_port == "tcp:11212" and config.engine == "sqlite"
        assert config.gateway == ("http://gateway-service:8000",)

    def test_grace_covers_drain(self, docs: list[Doc]) -> None:
        """terminationGracePeriodSeconds is longer than the drain timeout the daemon is given."""
        deployment = get(docs, "Deployment", "kvstore")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        drain = env_of(container).get("CHASHD_DRAIN_TIMEOUT")
        default = {spec.name: spec.default for spec in option_specs(KVStoreConfig)}["drain_timeout"]
        timeout = float(drain["value"]) if drain else float(default)
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout

    def test_service(self, docs: list[Doc]) -> None:
        """A ClusterIP Service on the HTTP and line ports."""
        service = get(docs, "Service", "kvstore")
        assert service["spec"]["type"] == "ClusterIP"
        assert {p["port"] for p in service["spec"]["ports"]} == {8080, 11212}
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(docs, "kvstore"))

    def test_hpa(self, docs: list[Doc]) -> None:
        """3..10 on CPU 70 % and memory 80 %; up 50 %/60 s, down 10 %/60 s; stabilization 60 s up, 300 s down."""
        hpa = get(docs, "HorizontalPodAutoscaler", "kvstore")
        assert hpa["apiVersion"] == "autoscaling/v2"
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "kvstore"}
        assert (spec["minReplicas"], spec["maxReplicas"]) == (3, 10)
        targets = {m["resource"]["name"]: m["resource"]["target"] for m in spec["metrics"]}
        assert targets == {
            "cpu": {"type": "Utilization", "averageUtilization": 70},
            "memory": {"type": "Utilization", "averageUtilization": 80},
        }
        up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
        assert up["stabilizationWindowSeconds"] == 60 and down["stabilizationWindowSeconds"] == 300
        assert up["policies"] == [{"type": "Percent", "value": 50, "periodSeconds": 60}]
        assert down["policies"] == [{"type": "Percent", "value": 10, "periodSeconds": 60}]
        # the Deployment starts at the HPA's minimum, so a cluster without metrics still runs 3
        assert get(docs, "Deployment", "kvstore")["spec"]["replicas"] == spec["minReplicas"]

    def test_memory_request_set(self, docs: list[Doc]) -> None:
        """Utilization targets need requests: the kvstore requests CPU and memory."""
        (container,) = get(docs, "Deployment", "kvstore")["spec"]["template"]["spec"]["containers"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])


class FollowerTests:
    """The follower gateways: a Deployment without Raft, its Service and HPA."""

    def _container(self, docs: list[Doc]) -> Doc:
        containers: list[Doc] = get(docs, "Deployment", "gateway-follower")["spec"]["template"]["spec"]["containers"]
        (container,) = containers
        return container

    def test_follows_the_raft_gateways(self, docs: list[Doc]) -> None:
        """It runs chash-gateway with --follow on the Raft gateways' Service, its pod name as its id, the token
        from the Secret, and no Raft password; as configured it would start."""
        container = self._container(docs)
        assert container["command"] == ["twistd", "--nodaemon", "--pidfile=", "chash-gateway"]
        env = env_of(container)
        assert env["GATEWAY_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["CHASHD_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "chashd-secrets", "key": "token"}
        assert "CHASHD_RAFT_PASSWORD" not in env
        environ = {k: e["value"] for k, e in env.items() if "value" in e}
        environ.update(GATEWAY_ID="gateway-follower-5d8f7-abcde", CHASHD_TOKEN="t")
        config = load_config(GatewayConfig, environ=environ)
        check_secrets(config)
        (url,) = config.follow
        host, port = url.removeprefix("http://").split(":")
        service = get(docs, "Service", host)
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(docs, "gateway"))
        assert config.port == "tcp:8000" and config.line_port == "tcp:11211"

    def test_workers_match_the_cpu_limit(self, docs: list[Doc]) -> None:
        """One worker per CPU of the limit (a container sees all its node's cores, not its limit)."""
        container = self._container(docs)
        workers = int(env_of(container)["CHASHD_WORKERS"]["value"])
        assert workers == int(ContainerTests._quantity(container["resources"]["limits"]["cpu"])) >= 2

    def test_service_and_hpa(self, docs: list[Doc]) -> None:
        """A Service on 8000 and 11211 for its pods only; an autoscaling/v2 HPA on CPU from 2 replicas."""
        service = get(docs, "Service", "gateway-follower")
        assert {p["port"] for p in service["spec"]["ports"]} == {8000, 11211}
        assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(docs, "gateway-follower"))
        assert not matches({"matchLabels": service["spec"]["selector"]}, pod_labels(docs, "gateway"))
        hpa = get(docs, "HorizontalPodAutoscaler", "gateway-follower")
        spec = hpa["spec"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway-follower"}
        assert spec["minReplicas"] == get(docs, "Deployment", "gateway-follower")["spec"]["replicas"] >= 2
        assert [m["resource"]["name"] for m in spec["metrics"]] == ["cpu"]

    def test_network(self, docs: list[Doc]) -> None:
        """Clients reach the followers' two ports; followers reach the kvstores and the gateways' HTTP port."""
        follower, kvstore, gateway = (pod_labels(docs, n) for n in ("gateway-follower", "kvstore", "gateway"))
        for port in (8000, 11211):
            assert ingress_allowed(docs, None, follower, port)
        assert not ingress_allowed(docs, None, follower, 8001)
        for port in (8080, 11212):
            assert ingress_allowed(docs, follower, kvstore, port)
        assert ingress_allowed(docs, follower, gateway, 8000)
        assert not ingress_allowed(docs, follower, gateway, 8001)


class DisruptionBudgetTests:
    """PodDisruptionBudgets."""

    @pytest.mark.parametrize("name", ["gateway", "gateway-follower", "kvstore"])
    def test_one_at_a_time(self, docs: list[Doc], name: str) -> None:
        """Each role's budget selects its pods only and lets one go at a time (Raft keeps its majority)."""
        pdb = get(docs, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert matches(pdb["spec"]["selector"], pod_labels(docs, name))
        for other in {"gateway", "gateway-follower", "kvstore"} - {name}:
            assert not matches(pdb["spec"]["selector"], pod_labels(docs, other))


def ingress_allowed(docs: list[Doc], source: dict[str, str] | None, target: dict[str, str], port: int) -> bool:
    """NetworkPolicy ingress semantics for one TCP connection.

    ``source`` is the labels of a pod in the same namespace, or None for a client outside the cluster.
    A pod no policy selects accepts everything; a selected pod accepts what some rule of a selecting policy allows.
    """
    policies = [
        p
        for p in docs
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"]["policyTypes"]
        and matches(p["spec"]["podSelector"], target)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None and not any(p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in ports):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"peer type not understood by this test: {peer}"
                if source is not None and matches(peer["podSelector"], source):
                    return True
    return False


class NetworkPolicyTests:
    """Who can open a connection to whom."""

    @pytest.fixture
    def pods(self, docs: list[Doc]) -> dict[str, dict[str, str]]:
        """The labels of a gateway pod, a kvstore pod, and some other pod of the namespace."""
        return {
            "gateway": pod_labels(docs, "gateway"),
            "kvstore": pod_labels(docs, "kvstore"),
            "other": {"app.kubernetes.io/name": "debug"},
        }

    def test_default_deny(self, docs: list[Doc]) -> None:
        """One policy selects every pod and allows nothing by itself."""
        deny = get(docs, "NetworkPolicy", "default-deny-ingress")
        assert deny["spec"]["podSelector"] == {}
        assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]

    def test_clients_reach_gateways(self, docs: list[Doc], pods: dict[str, dict[str, str]]) -> None:
        """Anyone reaches the gateways' HTTP and memcached ports."""
        for source in (None, pods["other"], pods["kvstore"]):
            assert ingress_allowed(docs, source, pods["gateway"], 8000)
            assert ingress_allowed(docs, source, pods["gateway"], 11211)

    def test_raft_only_between_gateways(self, docs: list[Doc], pods: dict[str, dict[str, str]]) -> None:
        """Only gateways reach the Raft port."""
        assert ingress_allowed(docs, pods["gateway"], pods["gateway"], 8001)
        for source in (None, pods["other"], pods["kvstore"]):
            assert not ingress_allowed(docs, source, pods["gateway"], 8001)

    def test_kvstores_reached_by_cluster_only(self, docs: list[Doc], pods: dict[str, dict[str, str]]) -> None:
        """Gateways (routing) and kvstores (handoff) reach the kvstores; clients and other pods do not."""
        for port in (8080, 11212):
            assert ingress_allowed(docs, pods["gateway"], pods["kvstore"], port)
            assert ingress_allowed(docs, pods["kvstore"], pods["kvstore"], port)
            assert not ingress_allowed(docs, None, pods["kvstore"], port)
            assert not ingress_allowed(docs, pods["other"], pods["kvstore"], port)

    def test_nothing_else(self, docs: list[Doc], pods: dict[str, dict[str, str]]) -> None:
        """Other ports and other pods are closed."""
        assert not ingress_allowed(docs, pods["gateway"], pods["gateway"], 22)
        assert not ingress_allowed(docs, pods["gateway"], pods["other"], 8000)

    def test_evaluator_default_open(self, docs: list[Doc]) -> None:
        """Without the policies every connection would be allowed (so the checks above can fail)."""
        open_docs = [d for d in docs if d["kind"] != "NetworkPolicy"]
        assert ingress_allowed(open_docs, None, {"app.kubernetes.io/name": "kvstore"}, 8080)


def test_readme_mentions_kind_and_minikube() -> None:
    """k8s/README.md says how to try it on kind or minikube, and keeps its troubleshooting steps."""
    text = (ROOT / "k8s" / "README.md").read_text()
    for needle in (
        "kind load docker-image",
        "minikube image load",
        "Images not found",
        "Gateway consensus issues",
        "KV stores not registering",
        "imagePullPolicy",
    ):
        assert needle in text
