#!/usr/bin/env python3
"""Renders deploy/kubernetes and validates every object it holds.

- Renders the base and the example overlay with `kubectl kustomize` where
  kubectl exists, otherwise with the small renderer below (resources,
  components, namespace, images, labels and strategic-merge patches by
  kind and name: what these manifests use). The components' own files are
  validated as they are too (components/hpa is in no overlay).
- Validates each object with kubernetes-validate (PyPI), strictly (an
  unknown field is an error), for the oldest and newest Kubernetes
  versions below. A kind without a Kubernetes schema is an error, except
  the custom resources of KEDA and the Prometheus Operator, which
  scripts/k8s-crds.mjs validates against their projects' published schemas
  (the @kubernetes-models packages from npm).
- Checks what the deployment promises: non-root, read-only root
  filesystem, requests and limits, probes, a grace period longer than the
  drain timeout, the PrometheusRule equal to deploy/alerts.yml, and an
  Ingress that publishes only the notebook's paths of a sidecar whose
  operator routes are on a listener of their own.

`--rules` prints the PrometheusRule generated from deploy/alerts.yml.
`--self-test` breaks a copy of the manifests (an unknown field in the
worker's Deployment, a string where KEDA wants a number, an Ingress path
`/`, no operator listener) and fails unless the check finds each.
"""

import argparse
import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
VERSIONS = ["1.29", "1.37"]
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}
RENDERED = ["base", "overlays/example"]
RULES_HEADER = "# Generated from deploy/alerts.yml by `make k8s-rules`: do not edit.\n"


def prometheus_rule() -> str:
    alerts = yaml.safe_load((ROOT / "deploy/alerts.yml").read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "runbridge"},
        "spec": {"groups": alerts["groups"]},
    }
    return RULES_HEADER + yaml.safe_dump(rule, sort_keys=False, width=1000)


def load_all(path: pathlib.Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base, patch):
    """Strategic merge as these manifests need it: maps merged, lists of
    named items merged by name, other lists replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out = list(base)
        for item in patch:
            at = [n for n, b in enumerate(out) if b["name"] == item["name"]]
            if at:
                out[at[0]] = merge(out[at[0]], item)
            else:
                out.append(item)
        return out
    return patch


def render_plain(directory: pathlib.Path) -> list:
    """Renders a kustomization without kustomize (see the module docs)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objs = []
    for entry in k.get("resources", []) + k.get("components", []):
        path = directory / entry
        objs += render_plain(path) if path.is_dir() else load_all(path)
    for p in k.get("patches", []):
        for patch in load_all(directory / p["path"]):
            for n, o in enumerate(objs):
                if (o["kind"], o["metadata"]["name"]) == (
                    patch["kind"],
                    patch["metadata"]["name"],
                ):
                    objs[n] = merge(o, patch)
    for o in objs:
        if "namespace" in k:
            o["metadata"]["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            o["metadata"].setdefault("labels", {}).update(group["pairs"])
        for c in (
            o.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            for img in k.get("images", []):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return objs


# `--plain` renders without kubectl even where it exists (to check the
# plain renderer itself).
USE_KUBECTL = shutil.which("kubectl") is not None


def render(tree: pathlib.Path, directory: str) -> list:
    if USE_KUBECTL:
        out = subprocess.run(
            ["kubectl", "kustomize", str(tree / directory)],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"kubectl kustomize {directory}: {out.stderr.strip()}")
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    return render_plain(tree / directory)


def component_files(tree: pathlib.Path) -> list:
    objs = []
    for f in sorted((tree / "components").glob("*/*.yaml")):
        if f.name != "kustomization.yaml":
            objs += load_all(f)
    return objs


def name(o) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def validate_core(o) -> list:
    errors = []
    for v in VERSIONS:
        try:
            kubernetes_validate.validate(o, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name(o)} against Kubernetes {v}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{name(o)}: no Kubernetes {v} schema for {o['apiVersion']}")
    return errors


def validate_crds(objs: list, node_modules: pathlib.Path) -> list:
    if not objs:
        return []
    out = subprocess.run(
        ["node", str(ROOT / "scripts/k8s-crds.mjs")],
        input=json.dumps(objs),
        capture_output=True,
        text=True,
        env={**os.environ, "NODE_PATH": str(node_modules)},
    )
    if out.returncode not in (0, 1):
        return [f"custom resources could not be checked: {out.stderr.strip()}"]
    return [line[6:] for line in out.stdout.splitlines() if line.startswith("ERROR")]


# What a notebook and Databricks call on the sidecar: all an Ingress may
# publish. (path, pathType)
NOTEBOOK_PATHS = {
    ("/cb", "Prefix"),
    ("/resolve", "Exact"),
    ("/reject", "Exact"),
    ("/heartbeat", "Exact"),
    ("/progress", "Exact"),
    ("/databricks/notifications", "Exact"),
}


def exposure(objs: list, config: dict) -> list:
    """The operator routes stay inside the cluster: every Ingress publishes
    only the notebook's paths, on the sidecar's notebook port, and the
    sidecar serves the operator routes on a listener of their own."""
    errors = []
    for o in objs:
        if o["kind"] != "Ingress":
            continue
        for rule in o["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                path = (p.get("path"), p.get("pathType"))
                if path not in NOTEBOOK_PATHS:
                    errors.append(
                        f"{name(o)} publishes {path[0]} ({path[1]}): an Ingress carries only the notebook's paths {sorted(q for q, _ in NOTEBOOK_PATHS)}"
                    )
                svc = p.get("backend", {}).get("service", {})
                if svc.get("name") != "runbridge-sidecar" or svc.get("port", {}).get("name") != "http":
                    errors.append(f"{name(o)} routes {path[0]} to {svc}: only to runbridge-sidecar's port http")
    if any(o["kind"] == "Ingress" for o in objs) and not config.get("runbridge", {}).get(
        "RUNBRIDGE__SIDECAR__OPERATOR_LISTEN"
    ):
        errors.append(
            "the ConfigMap runbridge sets no RUNBRIDGE__SIDECAR__OPERATOR_LISTEN: the published port would serve the operator routes too"
        )
    return errors


def policy(objs: list) -> list:
    """What docs/kubernetes.md promises about the workloads."""
    errors = []
    config = {
        o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"
    }
    errors += exposure(objs, config)
    drain = int(config.get("runbridge", {}).get("RUNBRIDGE__WORKER__DRAIN_TIMEOUT_SECONDS", 30))
    for o in objs:
        if o["kind"] != "Deployment":
            continue
        pod = o["spec"]["template"]["spec"]
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            errors.append(f"{name(o)}: the pod must set runAsNonRoot")
        if pod.get("terminationGracePeriodSeconds", 30) <= drain:
            errors.append(
                f"{name(o)}: terminationGracePeriodSeconds must exceed the drain timeout ({drain} s)"
            )
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation", True):
                errors.append(
                    f"{name(o)} {c['name']}: read-only root filesystem, no privilege escalation"
                )
            res = c.get("resources", {})
            if not all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")):
                errors.append(f"{name(o)} {c['name']}: cpu and memory requests and limits")
            if not (c.get("livenessProbe") and c.get("readinessProbe")):
                errors.append(f"{name(o)} {c['name']}: liveness and readiness probes")
    return errors


def check(tree: pathlib.Path, node_modules: pathlib.Path, verbose: bool) -> list:
    errors = []
    rules = tree / "base/prometheus-rule.yaml"
    if rules.read_text() != prometheus_rule():
        errors.append(f"{rules.relative_to(tree.parent.parent)} is not deploy/alerts.yml's rules: run `make k8s-rules`")
    seen = 0
    for label, objs in [(d, render(tree, d)) for d in RENDERED] + [
        ("components", component_files(tree))
    ]:
        core = [o for o in objs if o["apiVersion"].split("/")[0] not in CRD_GROUPS]
        crds = [o for o in objs if o["apiVersion"].split("/")[0] in CRD_GROUPS]
        found = [e for o in core for e in validate_core(o)]
        found += validate_crds(crds, node_modules)
        found += policy(objs)
        errors += [f"{label}: {e}" for e in found]
        seen += len(objs)
        if verbose:
            kinds = sorted({o["kind"] for o in objs})
            print(f"[k8s-check] {label}: {len(objs)} objects ({', '.join(kinds)})")
    if seen == 0:
        errors.append("no objects rendered")
    return errors


def self_test(node_modules: pathlib.Path) -> int:
    """The check must fail on a wrong field, in a core object and in a
    custom resource, and on an Ingress or a sidecar that publishes the
    operator routes."""
    breaks = [
        ("base/worker.yaml", "      terminationGracePeriodSeconds: 45", "      terminationGracePeriodSecond: 45"),
        ("components/keda/scaled-object.yaml", "  minReplicaCount: 2", '  minReplicaCount: "two"'),
        # The shipped Ingress once published every path.
        ("base/ingress.yaml", "          - path: /cb\n", "          - path: /\n"),
        ("base/configmap.yaml", "  RUNBRIDGE__SIDECAR__OPERATOR_LISTEN: 0.0.0.0:8081\n", ""),
    ]
    for path, good, bad in breaks:
        with tempfile.TemporaryDirectory() as tmp:
            tree = pathlib.Path(tmp) / "deploy/kubernetes"
            shutil.copytree(ROOT / "deploy/kubernetes", tree)
            f = tree / path
            text = f.read_text()
            assert good in text, f"{path} no longer has {good!r}"
            f.write_text(text.replace(good, bad))
            errors = check(tree, node_modules, verbose=False)
            if not errors:
                print(f"[k8s-check] FAIL: {path} with {bad.strip()!r} passed the check")
                return 1
            print(f"[k8s-check] a broken {path} fails as it should: {errors[0]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", action="store_true", help="print the generated PrometheusRule")
    ap.add_argument("--self-test", action="store_true", help="check that broken manifests fail")
    ap.add_argument("--plain", action="store_true", help="render without kubectl")
    ap.add_argument("--node-modules", default=str(ROOT / "target/node/node_modules"))
    args = ap.parse_args()
    global USE_KUBECTL
    USE_KUBECTL = USE_KUBECTL and not args.plain
    if args.rules:
        sys.stdout.write(prometheus_rule())
        return 0
    node_modules = pathlib.Path(args.node_modules)
    if args.self_test:
        return self_test(node_modules)
    renderer = "kubectl kustomize" if USE_KUBECTL else "the plain renderer"
    print(f"[k8s-check] rendering with {renderer}; Kubernetes {' and '.join(VERSIONS)}")
    errors = check(ROOT / "deploy/kubernetes", node_modules, verbose=True)
    for e in errors:
        print(f"[k8s-check] ERROR {e}")
    if errors:
        return 1
    print("[k8s-check] every object is valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
