#!/usr/bin/env python3
"""Turns a rendered voltail overlay into what Debian 12's podman 4.3 `kube play` can run.

Usage: kube_play_transform.py RENDERED.yaml WORKDIR > play.yaml

podman 4.3 plays Pods and Deployments but, measured on this machine (see
docs/operations.md, "Trying the manifests with podman kube play"):
  - runs ONE replica of a Deployment;
  - refuses fieldRef env other than metadata.name/metadata.uid ("fieldPath metadata.namespace
    is either not valid or not supported"), so the downward API is resolved here;
  - ignores subPath and subPathExpr on a PVC volume (the whole volume is mounted);
  - turns httpGet probes into healthchecks that run curl inside the image;
  - publishes every containerPort on the host, hostPort or not.
So, doing what the kubelet would do: every Deployment becomes `replicas` Pods named
<deployment>-<i>; env fieldRefs and $(VAR) references are resolved; the claim becomes a host
directory WORKDIR/volumes/<claim> (the NAS export), and each subPath/subPathExpr mount a
hostPath of its subdirectory (created, owned by uid 65532 like a provisioner's 0777 export);
ConfigMaps become host directories mounted read-only; probes and ports are dropped (the
script checks /health, /ready and /metrics from inside each pod's network namespace); the demo writers use the host network so that status.podIP is the
node IP, as for hostNetwork pods. Services, ServiceMonitors, PrometheusRules and Namespaces are
left out (nothing serves them here). Everything else (securityContext, resources, args, ports,
terminationGracePeriodSeconds) is passed through as rendered.
"""
import copy
import os
import re
import socket
import subprocess
import sys

import yaml


def host_ip():
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
        return out[0] if out else "127.0.0.1"
    except OSError:
        return "127.0.0.1"


def expand(value, env):
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def main():
    rendered, work = sys.argv[1], os.path.abspath(sys.argv[2])
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    node, node_ip = socket.gethostname(), host_ip()
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    out = []
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        ns = d["metadata"].get("namespace", "default")
        n = d["spec"].get("replicas", 1)
        for i in range(n):
            name = f"{d['metadata']['name']}-{i}"
            spec = copy.deepcopy(d["spec"]["template"]["spec"])
            writer = d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "demo-writer"
            if writer:
                spec["hostNetwork"] = True
            pod_ip = node_ip if writer else "0.0.0.0"
            fields = {"metadata.name": name, "metadata.namespace": ns, "spec.nodeName": node,
                      "status.hostIP": node_ip, "status.podIP": pod_ip}
            vols = {v["name"]: v for v in spec.get("volumes", [])}
            new_vols = []
            for c in spec["containers"] + spec.get("initContainers", []):
                env = {}
                for e in c.get("env", []):
                    if "valueFrom" in e and "fieldRef" in e["valueFrom"]:
                        e["value"] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
                        del e["valueFrom"]
                    elif "value" in e:
                        e["value"] = expand(e["value"], env)
                    env[e["name"]] = e.get("value", "")
                c["args"] = [expand(a, env) for a in c.get("args", [])]
                c.pop("livenessProbe", None)
                c.pop("readinessProbe", None)
                # podman 4.3 publishes a containerPort on the host even without hostPort
                # (three collectors then collide on :9464); nothing outside the pod needs it.
                c.pop("ports", None)
                for m in c.get("volumeMounts", []):
                    v = vols[m["name"]]
                    if "persistentVolumeClaim" in v:
                        sub = expand(m.pop("subPathExpr", None) or m.pop("subPath", ""), env)
                        path = os.path.join(work, "volumes", v["persistentVolumeClaim"]["claimName"], sub)
                    elif "configMap" in v:
                        cm = configmaps[v["configMap"]["name"]]
                        path = os.path.join(work, "configmaps", cm["metadata"]["name"])
                        os.makedirs(path, exist_ok=True)
                        for k, text in cm.get("data", {}).items():
                            with open(os.path.join(path, k), "w") as f:
                                f.write(text)
                    elif "hostPath" in v:
                        path = v["hostPath"]["path"]
                    else:
                        raise SystemExit(f"{name}: volume {m['name']} not supported here")
                    if not path.startswith(work) or "configmaps" in path:
                        pass
                    else:
                        os.makedirs(path, exist_ok=True)
                        os.chown(path, 65532, 65532)
                    vname = re.sub(r"[^a-z0-9-]", "-", f"{m['name']}-{len(new_vols)}".lower())
                    new_vols.append({"name": vname, "hostPath": {"path": path, "type": "Directory"}})
                    m["name"] = vname
            spec["volumes"] = new_vols
            spec["restartPolicy"] = "Never" if writer else "Always"
            spec.pop("automountServiceAccountToken", None)
            out.append({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": name, "labels": d["spec"]["template"]["metadata"].get("labels", {})},
                        "spec": spec})
    yaml.safe_dump_all(out, sys.stdout, sort_keys=False)


main()
