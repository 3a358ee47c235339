"""Helpers of scripts/k8s-check (run with the interpreter of its venv: PyYAML, jsonschema
and kubernetes-validate). Three commands:

  validate NAME RENDERED [--partial]
      RENDERED (the output of `kubectl kustomize`) against the Kubernetes schemas,
      strictly (an unknown field fails), for the oldest and newest Kubernetes versions
      checked; ScaledObjects against deploy/kubernetes/schemas; then what the manifests
      promise (both roles, probes, non-root, resources, the Secret's keys, disruption
      budgets, autoscalers, migrations, shutdown timing). --partial: the base, which
      has no Secret and no flusher autoscaler of its own.
  podman RENDERED OUTDIR
      What `podman kube play` (4.3) can run, from the rendering of the test overlay: the
      ConfigMap with each Deployment (OUTDIR/api.yaml, flusher.yaml), the migration Job's
      pod as a Pod (migrate.yaml), the Secret as podman wants it (secret.json: a flat map
      of base64 values; podman 4.3 plays no Secret objects), and plan.json: what the
      manifests say that the run then checks (probe paths, preStop, grace periods).
  run PLAN
      The real run: pods already played by scripts/k8s-check; posts, grants and reads
      through the API pods, kills the flusher pods mid-traffic and starts them again,
      then checks that every acknowledged message of a granted dialog is readable once,
      and that nothing of a refused dialog is.
"""

import base64
import copy
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE.parent / "deploy" / "kubernetes" / "schemas"
# The oldest Kubernetes the manifests are meant for (matchLabelKeys in topology spread is
# on by default from 1.27, unhealthyPodEvictionPolicy from 1.27) and the newest whose
# schemas kubernetes-validate bundles.
K8S_VERSIONS = ["1.30.0", None]
SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "DAPI_INGEST_TOKENS", "DAPI_READ_TOKENS", "DAPI_PRIVACY_TOKENS"}


class Failures:
    def __init__(self, name):
        self.name = name
        self.items = []

    def check(self, condition, message):
        if not condition:
            self.items.append(message)
        return condition


def load(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def duration_seconds(text):
    """dapi's durations: 500ms, 30s, 5m, 2h, 7d, or a bare number of seconds."""
    text = str(text).strip()
    for suffix, factor in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * factor
    return float(text)


def cpu_millis(quantity):
    q = str(quantity)
    return float(q[:-1]) if q.endswith("m") else float(q) * 1000


def memory_bytes(quantity):
    q = str(quantity)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    for unit, factor in units.items():
        if q.endswith(unit):
            return float(q[: -len(unit)]) * factor
    return float(q)


def container_env(container):
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container, config_maps, name):
    """The value of a variable set literally or through an envFrom ConfigMap."""
    entry = container_env(container).get(name)
    if entry is not None:
        return entry.get("value")
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and ref["name"] in config_maps:
            data = config_maps[ref["name"]].get("data", {})
            if name in data:
                return data[name]
    return None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- validate ---------------------------------------------------------------------------


def schema_validate(docs, f):
    import jsonschema
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    keda = json.loads((SCHEMAS / "keda-scaledobject.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(keda)
    keda_validator = jsonschema.Draft202012Validator(keda)
    versions = [v or kubernetes_validate.latest_version() for v in K8S_VERSIONS]
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("apiVersion") == "keda.sh/v1alpha1":
            for error in keda_validator.iter_errors(doc):
                f.check(False, f"{what}: {'/'.join(map(str, error.absolute_path))}: {error.message}")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                f.check(False, f"{what}: no schema for {doc.get('apiVersion')} in Kubernetes {version}")
            except kubernetes_validate.ValidationError as e:
                path = "/".join(map(str, e.path)) if hasattr(e, "path") else ""
                f.check(False, f"{what} (Kubernetes {version}): {path}: {e.message}")
    return versions


def check_pod_template(what, spec, f, config_maps, secrets, partial):
    f.check(spec.get("automountServiceAccountToken") is False, f"{what}: mounts a service account token")
    pod_sc = spec.get("securityContext", {})
    f.check(pod_sc.get("runAsNonRoot") is True, f"{what}: runAsNonRoot is not true")
    f.check(isinstance(pod_sc.get("runAsUser"), int) and pod_sc["runAsUser"] > 0, f"{what}: no non-zero runAsUser")
    f.check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: seccomp is not RuntimeDefault")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        cwhat = f"{what}/{c['name']}"
        sc = c.get("securityContext", {})
        f.check(sc.get("allowPrivilegeEscalation") is False, f"{cwhat}: allowPrivilegeEscalation is not false")
        f.check(sc.get("readOnlyRootFilesystem") is True, f"{cwhat}: root filesystem is not read-only")
        f.check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{cwhat}: does not drop all capabilities")
        f.check(sc.get("privileged") in (None, False), f"{cwhat}: privileged")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                f.check(r in res.get(kind, {}), f"{cwhat}: no {kind}.{r}")
        if all(r in res.get(k, {}) for k in ("requests", "limits") for r in ("cpu", "memory")):
            f.check(cpu_millis(res["requests"]["cpu"]) <= cpu_millis(res["limits"]["cpu"]), f"{cwhat}: cpu request above limit")
            f.check(
                memory_bytes(res["requests"]["memory"]) <= memory_bytes(res["limits"]["memory"]),
                f"{cwhat}: memory request above limit",
            )
            # docs/scaling.md: <= 39 MiB loaded per process; the limit leaves room for bodies.
            f.check(memory_bytes(res["limits"]["memory"]) >= 128 * 2**20, f"{cwhat}: memory limit below 128Mi")
        f.check(c.get("image") and c["image"] != "dapi", f"{cwhat}: the image is not set by kustomize (`images:`)")
        for source in c.get("envFrom", []):
            if "configMapRef" in source:
                f.check(source["configMapRef"]["name"] in config_maps, f"{cwhat}: envFrom a ConfigMap not in the rendering")
            if "secretRef" in source and not partial:
                f.check(source["secretRef"]["name"] in secrets, f"{cwhat}: envFrom a Secret not in the rendering")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            f.check(e["name"] == ref["key"], f"{cwhat}: {e['name']} reads key {ref['key']}")
            if partial:
                continue
            secret = secrets.get(ref["name"])
            if f.check(secret is not None, f"{cwhat}: {e['name']} reads Secret {ref['name']}, not in the rendering"):
                keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
                f.check(
                    ref["key"] in keys or ref.get("optional") is True,
                    f"{cwhat}: Secret {ref['name']} has no key {ref['key']}",
                )


def check_probes(what, c, f):
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet")
        if f.check(get is not None, f"{what}: no {probe} httpGet"):
            f.check(get.get("path") == path, f"{what}: {probe} on {get.get('path')}, expected {path}")
            port = get.get("port")
            f.check(ports.get(port, port) == 8000, f"{what}: {probe} not on port 8000 (DAPI_BIND)")


def validate(name, rendered, partial):
    docs = load(rendered)
    f = Failures(name)
    versions = schema_validate(docs, f)
    if f.items:  # the checks below assume well-formed objects
        print(f"k8s-check: {name}: FAIL against the schemas")
        for item in f.items:
            print(f"  - {item}")
        return 1
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config_maps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for d in by_kind.get("Secret", [])}
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}

    def role(component):
        found = [d for d in deployments.values() if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        f.check(len(found) == 1, f"{len(found)} Deployments of component {component}, expected 1")
        return found[0] if found else None

    api, flusher = role("api"), role("flusher")
    for dep, args in ((api, ["serve", "--no-flusher"]), (flusher, ["flusher"])):
        if dep is None:
            continue
        what = f"Deployment/{dep['metadata']['name']}"
        spec = dep["spec"]["template"]["spec"]
        check_pod_template(what, spec, f, config_maps, secrets, partial)
        f.check(len(spec["containers"]) == 1, f"{what}: {len(spec['containers'])} containers")
        c = spec["containers"][0]
        f.check(c.get("args") == args and not c.get("command"), f"{what}: runs {c.get('command')} {c.get('args')}, expected dapi {args}")
        f.check(env_value(c, config_maps, "DAPI_MIGRATE") == "false", f"{what}: DAPI_MIGRATE is not false")
        bind = env_value(c, config_maps, "DAPI_BIND") or ""
        f.check(bind.endswith(":8000") and not bind.startswith("127."), f"{what}: DAPI_BIND {bind!r} is not a pod address on 8000")
        check_probes(what, c, f)
        f.check(dep["spec"].get("replicas", 1) >= 2, f"{what}: fewer than 2 replicas")
        f.check(len(spec.get("topologySpreadConstraints", [])) >= 1, f"{what}: no topologySpreadConstraints")
        timeout = env_value(c, config_maps, "DAPI_SHUTDOWN_TIMEOUT")
        if f.check(timeout is not None, f"{what}: DAPI_SHUTDOWN_TIMEOUT not set"):
            pre = c.get("lifecycle", {}).get("preStop", {})
            pre_s = 0.0
            if "exec" in pre:
                cmd = pre["exec"]["command"]
                f.check(cmd[0] == "sleep" and len(cmd) == 2, f"{what}: preStop is not `sleep N`")
                pre_s = float(cmd[1])
            elif "sleep" in pre:
                pre_s = float(pre["sleep"]["seconds"])
            grace = spec.get("terminationGracePeriodSeconds", 30)
            f.check(
                grace >= pre_s + duration_seconds(timeout) + 2,
                f"{what}: terminationGracePeriodSeconds {grace} < preStop {pre_s}s + DAPI_SHUTDOWN_TIMEOUT {timeout} + 2s",
            )
            if dep is api:
                f.check(pre_s > 0, f"{what}: no preStop delay (endpoint removal races SIGTERM)")
        for e in ("DATABASE_URL", "REDIS_URL"):
            f.check(
                "valueFrom" in container_env(c).get(e, {}) or any("secretRef" in s for s in c.get("envFrom", [])),
                f"{what}: {e} not read from a Secret",
            )
        if dep is api:
            for e in ("DAPI_INGEST_TOKENS", "DAPI_READ_TOKENS"):
                f.check("valueFrom" in container_env(c).get(e, {}), f"{what}: {e} not read from a Secret")
        # Every pod of the role has a disruption budget.
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"]["selector"], labels)]
        f.check(len(pdbs) == 1, f"{what}: {len(pdbs)} PodDisruptionBudgets select its pods")
        f.check(selects(dep["spec"]["selector"], labels), f"{what}: its selector does not select its pods")

    # Services route to the API only.
    for s in by_kind.get("Service", []):
        if api:
            f.check(selects({"matchLabels": s["spec"]["selector"]}, api["spec"]["template"]["metadata"]["labels"]), f"Service/{s['metadata']['name']}: does not select the API pods")

    # Autoscalers: the API on CPU; the flusher by exactly one of KEDA and a plain HPA.
    scalers = {}
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        ref = h["spec"]["scaleTargetRef"]
        scalers.setdefault(ref["name"], []).append(h)
        f.check(ref["name"] in deployments and ref.get("kind") == "Deployment", f"HPA/{h['metadata']['name']}: targets {ref}")
        f.check(h["spec"].get("minReplicas", 1) >= 2, f"HPA/{h['metadata']['name']}: minReplicas < 2")
    for so in by_kind.get("ScaledObject", []):
        sp, what = so["spec"], f"ScaledObject/{so['metadata']['name']}"
        ref = sp["scaleTargetRef"]
        scalers.setdefault(ref["name"], []).append(so)
        f.check(ref["name"] in deployments and ref.get("kind", "Deployment") == "Deployment", f"{what}: targets {ref}")
        lo, hi = sp.get("minReplicaCount", 0), sp.get("maxReplicaCount", 100)
        f.check(2 <= lo <= hi, f"{what}: minReplicaCount {lo}, maxReplicaCount {hi}")
        if "fallback" in sp:
            f.check(lo <= sp["fallback"]["replicas"] <= hi, f"{what}: fallback replicas outside min..max")
        for t in sp["triggers"]:
            if t["type"] == "prometheus":
                q = t["metadata"]["query"]
                f.check("dapi_flush_queue_length" in q, f"{what}: the query does not read dapi_flush_queue_length")
                f.check(not q.replace(" ", "").startswith("sum("), f"{what}: sum() over pods counts the queue once per pod")
    if api:
        hpas = scalers.get(api["metadata"]["name"], [])
        f.check(
            len(hpas) == 1
            and hpas[0]["kind"] == "HorizontalPodAutoscaler"
            and any(m.get("resource", {}).get("name") == "cpu" for m in hpas[0]["spec"]["metrics"]),
            "the API Deployment has no single CPU HorizontalPodAutoscaler",
        )
    if flusher and not partial:
        n = len(scalers.get(flusher["metadata"]["name"], []))
        f.check(n == 1, f"the flusher Deployment has {n} autoscalers (expected exactly one: KEDA or a plain HPA)")

    # Migrations: one Job running `dapi migrate`, with the same image.
    jobs = by_kind.get("Job", [])
    if f.check(len(jobs) == 1, f"{len(jobs)} Jobs, expected the migration Job"):
        job = jobs[0]
        spec = job["spec"]["template"]["spec"]
        what = f"Job/{job['metadata']['name']}"
        check_pod_template(what, spec, f, config_maps, secrets, partial)
        c = spec["containers"][0]
        f.check(c.get("args") == ["migrate"], f"{what}: runs {c.get('args')}, expected dapi migrate")
        f.check(spec.get("restartPolicy") in ("Never", "OnFailure"), f"{what}: restartPolicy")
        if api:
            f.check(c["image"] == api["spec"]["template"]["spec"]["containers"][0]["image"], f"{what}: not the API's image")

    # The Secret: every key the workloads read, placeholders only.
    if not partial:
        if f.check(len(secrets) == 1, f"{len(secrets)} Secrets, expected 1"):
            secret = next(iter(secrets.values()))
            keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
            f.check(SECRET_KEYS <= keys, f"Secret: missing {sorted(SECRET_KEYS - keys)}")
            if os.environ.get("K8S_CHECK_REAL_SECRET") != "1":
                for k, v in secret.get("stringData", {}).items():
                    f.check("REPLACE-ME" in v, f"Secret: {k} is not a placeholder")
                    f.check(".invalid" in v or "URL" not in k, f"Secret: {k} names a host that might resolve")

    # Overlay-specific settings.
    cm = next(iter(config_maps.values()), {}).get("data", {})
    if name == "overlays/redis-cluster":
        f.check(cm.get("DAPI_REDIS_CLUSTER") == "true", "redis-cluster: DAPI_REDIS_CLUSTER is not true")
        f.check(cm.get("DAPI_REDIS_WAIT_REPLICAS", "0").isdigit(), "redis-cluster: DAPI_REDIS_WAIT_REPLICAS not set")
        redis = next(iter(secrets.values()), {}).get("stringData", {}).get("REDIS_URL", "")
        f.check(redis.count("redis://") >= 2, "redis-cluster: REDIS_URL lists fewer than 2 seed nodes")
    elif name == "overlays/read-replica":
        f.check(api is not None and "DATABASE_READ_URL" in container_env(api["spec"]["template"]["spec"]["containers"][0]), "read-replica: the API does not read DATABASE_READ_URL")
        f.check(flusher is None or "DATABASE_READ_URL" not in container_env(flusher["spec"]["template"]["spec"]["containers"][0]), "read-replica: the flusher reads DATABASE_READ_URL")
    elif cm:
        f.check(cm.get("DAPI_REDIS_CLUSTER", "false") == "false", f"{name}: DAPI_REDIS_CLUSTER set outside the redis-cluster overlay")

    kinds = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_kind.items()))
    if f.items:
        print(f"k8s-check: {name}: FAIL ({kinds})")
        for item in f.items:
            print(f"  - {item}")
        return 1
    print(f"k8s-check: {name}: ok, strict against Kubernetes {' and '.join(versions)} ({kinds})")
    return 0


# --- podman -----------------------------------------------------------------------------


def podman_files(rendered, outdir):
    """podman 4.3's kube play: Pods and Deployments with their ConfigMaps; no Secret, Job,
    Service, autoscaler or budget objects. It also publishes every containerPort on the
    host (ports 8000 there are taken), and turns a liveness probe into a healthcheck
    that needs curl (not in the image) and systemd (not here): those are left out and
    the run checks the probes' paths itself, as the kubelet would."""
    docs = load(rendered)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    cms = [d for d in docs if d["kind"] == "ConfigMap"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    values = dict(secret.get("stringData", {}))
    values.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    (out / "secret.json").write_text(json.dumps({k: base64.b64encode(v.encode()).decode() for k, v in values.items()}))
    plan = {"secret": secret["metadata"]["name"], "tokens": {}, "roles": {}}
    for k in ("DAPI_INGEST_TOKENS", "DAPI_READ_TOKENS"):
        plan["tokens"][k] = values[k].split(",")[0]

    def strip(spec):
        spec = copy.deepcopy(spec)
        for c in spec["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.pop("ports", [])}
            probes = {}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    get = c.pop(probe)["httpGet"]
                    probes[probe] = {"path": get["path"], "port": ports.get(get["port"], get["port"])}
            pre = c.pop("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        return spec, probes, pre, c

    for d in docs:
        if d["kind"] == "Deployment":
            role = d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            dep = copy.deepcopy(d)
            spec, probes, pre, c = strip(d["spec"]["template"]["spec"])
            dep["spec"]["template"]["spec"] = spec
            (out / f"{role}.yaml").write_text(yaml.safe_dump_all(cms + [dep]))
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            plan["roles"][role] = {
                "deployment": d["metadata"]["name"],
                "replicas": d["spec"].get("replicas", 1),
                "container": c["name"],
                "probes": probes,
                "preStop": pre,
                "grace": spec.get("terminationGracePeriodSeconds", 30),
                "shutdownTimeout": duration_seconds(env.get("DAPI_SHUTDOWN_TIMEOUT", "30s")),
                "args": c.get("args"),
                "file": str(out / f"{role}.yaml"),
            }
        elif d["kind"] == "Job":
            spec, _, _, c = strip(d["spec"]["template"]["spec"])
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": d["metadata"]["name"], "labels": d["spec"]["template"]["metadata"]["labels"]},
                "spec": spec,
            }
            (out / "migrate.yaml").write_text(yaml.safe_dump_all(cms + [pod]))
            plan["roles"]["migrate"] = {"pod": d["metadata"]["name"], "container": c["name"], "file": str(out / "migrate.yaml")}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    print(json.dumps({role: r["file"] for role, r in plan["roles"].items()}))
    return 0


# --- run --------------------------------------------------------------------------------


def podman(*args, check=True):
    done = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def say(text):
    print(f"k8s-check: {text}", flush=True)


class Api:
    """Requests to the API pods, round robin (as a Service would spread them)."""

    def __init__(self, hosts, ingest, read):
        self.hosts, self.ingest, self.read = hosts, ingest, read
        self.turn = 0
        self.lock = threading.Lock()

    def url(self, path):
        with self.lock:
            self.turn += 1
            host = self.hosts[self.turn % len(self.hosts)]
        return f"http://{host}:8000{path}"

    def call(self, method, url, token, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


def get_status(url, timeout=3):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def queue_length(host):
    """dapi_flush_queue_length from a pod's /metrics: the backlog the autoscalers read."""
    with urllib.request.urlopen(f"http://{host}:8000/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("dapi_flush_queue_length "):
                return float(line.split()[1])
    raise RuntimeError(f"no dapi_flush_queue_length in http://{host}:8000/metrics")


def pod_ip(pod, container, network):
    return podman("inspect", f"{pod}-{container}", "--format", "{{(index .NetworkSettings.Networks \"%s\").IPAddress}}" % network)


def wait_for(what, predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not within {seconds}s")


def run(plan_path):
    plan = json.loads(Path(plan_path).read_text())
    network = os.environ["K8S_CHECK_NETWORK"]
    roles = plan["roles"]
    started = time.monotonic()

    # The pods of both roles: as many as the Deployments' replicas.
    pods = {r: [f"{roles[r]['deployment']}-pod-{i}" for i in range(roles[r]["replicas"])] for r in ("api", "flusher")}
    ips = {r: [pod_ip(p, roles[r]["container"], network) for p in pods[r]] for r in pods}
    for role in ("api", "flusher"):
        # Nothing is published on the host: the pods answer on their network only.
        for p in pods[role]:
            bound = podman("port", f"{p}-{roles[role]['container']}", check=False)
            if bound:
                raise RuntimeError(f"{p} publishes host ports: {bound}")
            uid = podman("exec", f"{p}-{roles[role]['container']}", "id", "-u")
            if uid == "0":
                raise RuntimeError(f"{p} runs as root")
            ro = podman("inspect", f"{p}-{roles[role]['container']}", "--format", "{{.HostConfig.ReadonlyRootfs}}")
            if ro != "true":
                raise RuntimeError(f"{p}: root filesystem not read-only")
        for ip in ips[role]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                p = roles[role]["probes"][probe]
                url = f"http://{ip}:{p['port']}{p['path']}"
                wait_for(f"{role} {probe} {url}", lambda: get_status(url) == 200, 60)
    say(f"{len(pods['api'])} API pods and {len(pods['flusher'])} flusher pods ready on their probes ({', '.join(ips['api'] + ips['flusher'])}), uid non-zero, read-only root")

    api = Api(ips["api"], plan["tokens"]["DAPI_INGEST_TOKENS"], plan["tokens"]["DAPI_READ_TOKENS"])
    customer = random.randint(10**6, 10**9)
    dialogs = int(os.environ.get("K8S_CHECK_DIALOGS", "240"))
    per_dialog = 5
    acked = {}  # dialog -> {seq: text}
    decided = {}  # dialog -> approved, once 202'd
    errors = []
    progress = {"done": 0}

    def traffic():
        base = random.randint(10**6, 10**9)
        for i in range(dialogs):
            dialog = base + i
            texts = [f"k8s-check {customer} {dialog} #{k}" for k in range(per_dialog)]
            # Half the dialogs in one batch, half as single POSTs.
            if i % 2 == 0:
                items = [{"customerId": customer, "dialogId": dialog, "text": t, "language": "EN", "messageId": f"m-{dialog}-{k}"} for k, t in enumerate(texts)]
                status, answer = api.call("POST", api.url("/data"), api.ingest, {"messages": items})
                if status != 200:
                    errors.append(f"POST /data batch: {status} {answer}")
                    continue
                for t, r in zip(texts, answer["results"]):
                    if r.get("status") == 202:
                        acked.setdefault(dialog, {})[r["seq"]] = t
                    else:
                        errors.append(f"batch item: {r}")
            else:
                for t in texts:
                    status, answer = api.call("POST", api.url(f"/data/{customer}/{dialog}"), api.ingest, {"text": t, "language": "EN"})
                    if status == 202:
                        acked.setdefault(dialog, {})[answer["seq"]] = t
                    else:
                        errors.append(f"POST /data/{customer}/{dialog}: {status} {answer}")
            approved = i % 3 != 2  # two in three granted, one refused
            status, answer = api.call("POST", api.url(f"/consents/{dialog}"), api.ingest, {"approved": approved})
            # A grant is 202 (the flusher moves the dialog); a refusal 200 (erased when answered).
            if status == (202 if approved else 200):
                decided[dialog] = approved
            else:
                errors.append(f"POST /consents/{dialog}: {status} {answer}")
            progress["done"] = i + 1
            time.sleep(0.02)

    worker = threading.Thread(target=traffic)
    worker.start()
    fl = roles["flusher"]
    kills = []

    def at(fraction):
        wait_for(f"traffic at {fraction:.0%}", lambda: progress["done"] >= fraction * dialogs or not worker.is_alive(), 120)

    # Mid-traffic: SIGKILL one flusher pod (the other claims its unacknowledged entries
    # after DAPI_FLUSH_CLAIM_IDLE), then the other (no flusher at all: the queue grows),
    # then start them again one by one (each takes up its own pending entries again).
    at(0.25)
    podman("pod", "kill", pods["flusher"][0])
    kills.append(f"killed {pods['flusher'][0]} at {progress['done']}/{dialogs}")
    if len(pods["flusher"]) > 1:
        at(0.45)
        podman("pod", "kill", pods["flusher"][1])
        kills.append(f"killed {pods['flusher'][1]} at {progress['done']}/{dialogs}")
    at(0.65)
    # With no flusher running, the backlog the autoscalers read has grown.
    outage_queue = queue_length(ips["api"][0])
    if len(pods["flusher"]) > 1 and not outage_queue > 0:
        raise RuntimeError(f"dapi_flush_queue_length is {outage_queue} with every flusher down")
    podman("pod", "start", pods["flusher"][0])
    kills.append(f"started {pods['flusher'][0]} at {progress['done']}/{dialogs}")
    if len(pods["flusher"]) > 1:
        at(0.8)
        podman("pod", "start", pods["flusher"][1])
        kills.append(f"started {pods['flusher'][1]} at {progress['done']}/{dialogs}")
    worker.join()
    say(f"traffic: {dialogs} dialogs x {per_dialog} messages, {sum(map(len, acked.values()))} messages 202, {sum(decided.values())} granted, {len(decided) - sum(decided.values())} refused; {'; '.join(kills)}")
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[:3]}")

    # Every acknowledged message of a granted dialog readable, once; nothing refused.
    expected = {(d, s): t for d, m in acked.items() if decided.get(d) for s, t in m.items()}
    refused = {d for d, ok in decided.items() if not ok}
    state = {}

    def read_all():
        seen, dup, leaked = {}, [], []
        url = api.url(f"/data/?customerId={customer}&pageSize=1000&cursor=")
        while url:
            status, page = api.call("GET", url, api.read)
            if status != 200:
                raise RuntimeError(f"GET {url}: {status} {page}")
            for m in page["results"]:
                key = (m["dialogId"], m["seq"])
                if key in seen:
                    dup.append(key)
                seen[key] = m["text"]
                if m["dialogId"] in refused:
                    leaked.append(key)
            url = page.get("next")
        state.update(seen=seen, dup=dup, leaked=leaked)
        return not (set(expected) - set(seen))

    t0 = time.monotonic()
    try:
        wait_for("every acknowledged message of a granted dialog readable", read_all, 90)
    except RuntimeError:
        missing = sorted(set(expected) - set(state.get("seen", {})))
        raise RuntimeError(f"lost: {len(missing)} of {len(expected)} acknowledged messages of granted dialogs, e.g. {missing[:5]}") from None
    wrong = [k for k, t in expected.items() if state["seen"][k] != t]
    extra = sorted(set(state["seen"]) - set(expected))
    if state["dup"] or state["leaked"] or wrong or extra:
        raise RuntimeError(f"duplicated {state['dup'][:5]}, refused but readable {state['leaked'][:5]}, wrong text {wrong[:5]}, unexpected {extra[:5]}")
    wait_for("the flush queue drained (dapi_flush_queue_length 0)", lambda: queue_length(ips["api"][0]) == 0, 30)
    say(f"dapi_flush_queue_length (the KEDA trigger's metric) was {outage_queue:.0f} with every flusher down, 0 at the end")
    say(f"nothing lost: all {len(expected)} acknowledged messages of {sum(decided.values())} granted dialogs readable once ({time.monotonic() - t0:.1f}s after the traffic), none of {len(refused)} refused dialogs")

    # Draining: what the kubelet does to a pod being replaced - preStop, then SIGTERM
    # with the rest of the grace period - on one pod of each role: it must exit 0, within
    # DAPI_SHUTDOWN_TIMEOUT (a clean drain), not by the grace period's SIGKILL.
    for role in ("api", "flusher"):
        r, pod = roles[role], pods[role][-1]
        ctr = f"{pod}-{r['container']}"
        t = time.monotonic()
        if r["preStop"]:
            podman("exec", ctr, *r["preStop"])
        pre = time.monotonic() - t
        t = time.monotonic()
        podman("stop", "-t", str(max(1, int(r["grace"] - pre))), ctr)
        took = time.monotonic() - t
        code = podman("inspect", ctr, "--format", "{{.State.ExitCode}}")
        if code != "0" or took > r["shutdownTimeout"]:
            raise RuntimeError(f"{ctr}: SIGTERM -> exit {code} after {took:.1f}s (DAPI_SHUTDOWN_TIMEOUT {r['shutdownTimeout']}s)")
        say(f"{role} pod drained: preStop {' '.join(r['preStop'] or ['none'])} ({pre:.1f}s), SIGTERM -> exit 0 in {took:.1f}s (grace {r['grace']}s)")
    say(f"real run ok in {time.monotonic() - started:.0f}s")
    return 0


def main(argv):
    if len(argv) >= 3 and argv[0] == "validate":
        return validate(argv[1], argv[2], "--partial" in argv[3:])
    if len(argv) == 3 and argv[0] == "podman":
        return podman_files(argv[1], argv[2])
    if len(argv) == 2 and argv[0] == "run":
        try:
            return run(argv[1])
        except RuntimeError as e:
            print(f"k8s-check: FAIL: {e}", flush=True)
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
