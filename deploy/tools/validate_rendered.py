#!/usr/bin/env python3
"""Checks on a rendered overlay (`kubectl kustomize ...` output) beyond the Kubernetes schemas.

Usage: validate_rendered.py RENDERED.yaml [--voltail BIN]

1. Prometheus Operator kinds (ServiceMonitor, PrometheusRule) are validated against the strict
   JSON schemas in deploy/schemas/ (kubernetes-validate has no schemas for CRDs). Any other
   kind that is not built into Kubernetes is an error, so nothing is skipped silently.
2. Cross-references that no schema sees: the ServiceMonitor selects a Service that has its
   port; every metric named in alerts and in the Grafana dashboard is one voltail exports;
   every alert's runbook anchor is a heading of docs/operations.md; the dashboard JSON parses.
3. With --voltail, the config of every collector workload is run through `voltail check` with
   the environment its container would get (downward-API fields filled with sample values,
   $(VAR) references expanded as the kubelet does), and a StatefulSet's shard count must equal
   its replicas.

Exits non-zero and prints every failure.
"""
import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import jsonschema
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
REPO = DEPLOY.parent
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): DEPLOY / "schemas/servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): DEPLOY / "schemas/prometheusrule_v1.json",
}
# The documented metric set (README); Prometheus adds `up`. The dashboard may show any of these
# (some arrive with the network sinks); alerts may only use metrics the code exports today
# (string literals in collector/src), so that every alert can fire.
METRICS = {
    "up",
    "voltail_files_watched", "voltail_read_bytes_total", "voltail_read_lines_total",
    "voltail_sink_bytes_total", "voltail_sink_errors_total", "voltail_checkpoint_flushes_total",
    "voltail_checkpoint_age_seconds", "voltail_lag_bytes", "voltail_lines_split_total",
    "voltail_symlinks_refused_total", "voltail_reader_backend", "voltail_probe_active",
    "voltail_probe_events_total", "voltail_probe_lost_total", "voltail_sink_requests_total",
    "voltail_sink_retries_total", "voltail_sink_failures_total",
    "voltail_sink_dead_letter_events_total",
}

def exported_metrics():
    names = {"up"}
    for rs in (REPO / "collector/src").rglob("*.rs"):
        names |= set(re.findall(r'"(voltail_[a-z0-9_]+)"', rs.read_text()))
    return names


BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "rbac.authorization.k8s.io/v1",
                  "networking.k8s.io/v1", "autoscaling/v2"}
SAMPLE_FIELDS = {
    "metadata.namespace": lambda pod, ns: ns,
    "metadata.name": lambda pod, ns: pod,
    "spec.nodeName": lambda pod, ns: "node-a",
    "status.hostIP": lambda pod, ns: "192.0.2.10",
    "status.podIP": lambda pod, ns: "192.0.2.77",
}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg):
    print(f"ok   {msg}")


def name_of(doc):
    return f"{doc['kind']}/{doc['metadata']['name']}"


def metric_names(expr):
    # identifiers followed by { [ ( or space that look like metric names, minus PromQL words
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b\s*(?=[{\[)]|\s|$|==|>|<)", expr))
    return {w for w in words if w.startswith("voltail_") or w == "up"}


def anchors(markdown):
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#+\s+(.*)$", line)
        if m:
            a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(a)
    return out


CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                  "ClusterRoleBinding", "CustomResourceDefinition"}


def check_namespaces(docs):
    # kustomize applies a namespace only at the level that declares it: a component's resources
    # would otherwise land in the user's current namespace, away from the claim.
    nss = {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
    if None in nss or len(nss) != 1:
        bad = [name_of(d) for d in docs
               if d["kind"] not in CLUSTER_SCOPED and not d["metadata"].get("namespace")]
        fail(f"namespaced resources must share one namespace: {sorted(map(str, nss))} {bad}")
    else:
        ok(f"all namespaced resources in namespace {nss.pop()}")


def check_crds(docs):
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in SCHEMAS:
            schema = json.loads(SCHEMAS[key].read_text())
            errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=str)
            for e in errs:
                path = ".".join(str(p) for p in e.absolute_path)
                fail(f"{name_of(doc)}: {path}: {e.message}")
            if not errs:
                ok(f"{name_of(doc)} valid against {SCHEMAS[key].relative_to(REPO)}")
        elif key[0] not in BUILTIN_GROUPS:
            fail(f"{name_of(doc)}: no schema for {key[0]} {key[1]} (add it to deploy/schemas)")


def check_refs(docs):
    services = [d for d in docs if d["kind"] == "Service"]
    ops = (REPO / "docs/operations.md")
    heads = anchors(ops.read_text()) if ops.exists() else set()
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"].get("matchLabels", {})
        hits = [s for s in services
                if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not hits:
            fail(f"{name_of(sm)}: selector {sel} matches no Service")
        for ep in sm["spec"]["endpoints"]:
            if not any(p.get("name") == ep.get("port") for s in hits for p in s["spec"]["ports"]):
                fail(f"{name_of(sm)}: no selected Service has a port named {ep.get('port')!r}")
        else:
            ok(f"{name_of(sm)} selects {[name_of(s) for s in hits]}")
    exported = exported_metrics()
    for pr in (d for d in docs if d["kind"] == "PrometheusRule"):
        before = len(failures)
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                what = f"{name_of(pr)} alert {r.get('alert') or r.get('record')}"
                unknown = metric_names(str(r["expr"])) - exported
                if unknown:
                    fail(f"{what}: metrics not exported by collector/src: {sorted(unknown)}")
                if not metric_names(str(r["expr"])):
                    fail(f"{what}: expression names no voltail metric")
                rb = r.get("annotations", {}).get("runbook", "")
                anchor = rb.split("#", 1)[1] if "#" in rb else ""
                if not anchor or anchor not in heads:
                    fail(f"{what}: runbook {rb!r} is not a heading of docs/operations.md")
        if len(failures) == before:
            ok(f"{name_of(pr)} rules name known metrics and documented runbooks")
    for cm in (d for d in docs if d["kind"] == "ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            if not key.endswith(".json"):
                continue
            try:
                dash = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{name_of(cm)} {key}: not JSON: {e}")
                continue
            exprs = [t["expr"] for p in dash.get("panels", []) for t in p.get("targets", [])]
            used = set().union(*(metric_names(e) for e in exprs)) if exprs else set()
            if used - METRICS - exported:
                fail(f"{name_of(cm)} {key}: unknown metrics {sorted(used - METRICS - exported)}")
            ids = [p["id"] for p in dash.get("panels", [])]
            if len(ids) != len(set(ids)):
                fail(f"{name_of(cm)} {key}: duplicate panel ids")
            ok(f"{name_of(cm)} {key}: {len(ids)} panels, {len(used)} metrics, all known")


def expand_k8s(value, env):
    # the kubelet's $(VAR) expansion; $$(VAR) escapes
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def voltail_check(voltail, text, env):
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        try:
            r = subprocess.run([voltail, "check", "--config", f.name], env=env,
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            return -1, f"cannot run {voltail}: {e}"
        return r.returncode, (r.stdout + r.stderr).strip().replace(f.name, "voltail.toml")


def check_configs(docs, voltail):
    if voltail is not None:
        # Negative control: a `check` that accepts a broken config proves nothing.
        code, out = voltail_check(voltail, 'data_dir = "/tmp"\npoll_intervall = "1s"\n', {})
        if code == 0:
            fail(f"{voltail} check accepted a config with an unknown key: no working `check`")
            return
        ok(f"voltail check refuses a broken config (exit {code}: {out.splitlines()[0][:90]})")
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                 and d["metadata"].get("labels", {}).get("app.kubernetes.io/component")
                 == "collector"]
    if not workloads:
        if any(d["kind"] in ("Deployment", "StatefulSet") for d in docs):
            fail("no collector workload (label app.kubernetes.io/component=collector)")
        else:
            ok("no collector workload in this overlay (nothing for voltail check)")
    for w in workloads:
        ns = w["metadata"].get("namespace", "default")
        replicas = w["spec"].get("replicas", 1)
        pods = ([f"{w['metadata']['name']}-{i}" for i in range(replicas)]
                if w["kind"] == "StatefulSet" else [f"{w['metadata']['name']}-6d5f7b9c8-x2x4q"])
        spec = w["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            args = c.get("args", [])
            if "--config" not in args:
                continue
            path = pathlib.PurePosixPath(args[args.index("--config") + 1])
            mount = next((m for m in c.get("volumeMounts", [])
                          if pathlib.PurePosixPath(m["mountPath"]) == path.parent), None)
            cm_name = (vols.get(mount["name"], {}).get("configMap", {}).get("name")
                       if mount else None)
            text = (cms.get(cm_name, {}).get("data") or {}).get(path.name)
            if text is None:
                fail(f"{name_of(w)}: {path} is not a key of a mounted ConfigMap")
                continue
            for pod in pods:
                env = {}
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = expand_k8s(e["value"], env)
                    elif "fieldRef" in e.get("valueFrom", {}):
                        fp = e["valueFrom"]["fieldRef"]["fieldPath"]
                        env[e["name"]] = SAMPLE_FIELDS[fp](pod, ns)
                shard = env.get("VOLTAIL_SHARD")
                if w["kind"] == "StatefulSet" and shard:
                    count = shard.rsplit("/", 1)[-1]
                    if count != str(replicas):
                        fail(f"{name_of(w)}: VOLTAIL_SHARD {shard!r} but replicas: {replicas}")
                if voltail is None:
                    continue
                code, out = voltail_check(voltail, text, env)
                if code != 0:
                    fail(f"{name_of(w)} as {pod}: voltail check {cm_name}: exit {code}: {out}")
                else:
                    ok(f"{name_of(w)} as {pod} (shard {shard}): voltail check passed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--voltail")
    a = ap.parse_args()
    docs = [d for d in yaml.safe_load_all(open(a.rendered)) if d]
    check_namespaces(docs)
    check_crds(docs)
    check_refs(docs)
    check_configs(docs, a.voltail)
    if failures:
        print(f"{len(failures)} failure(s) in {a.rendered}")
        sys.exit(1)


main()
