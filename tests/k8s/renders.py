"""Renders of the components and overlays beyond those of test_manifests.py, and what the test
files that check them share: strict validation, mounts, and the real CLI parser's answer for each
container of each render here.

Rendering needs `kubectl` (its built-in kustomize), as in test_manifests.py; no cluster is contacted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tempfile
from pathlib import Path

import kubernetes_validate
import yaml

from tests.k8s import test_manifests as manifests
from tests.k8s.test_manifests import COMPONENTS, K8S, KUSTOMIZATIONS, effective, kustomize

BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
LLAMA = K8S / "overlays" / "llama-8b"
COMPONENT_DIR = K8S / "components"
MODELS_PVC = COMPONENT_DIR / "models-pvc"
MODELS_IMAGE_VOLUME = COMPONENT_DIR / "models-image-volume"
AUTOSCALING_HPA = COMPONENT_DIR / "autoscaling-hpa"
AUTOSCALING_KEDA = COMPONENT_DIR / "autoscaling-keda"
VERIFIER_HEADLESS = COMPONENT_DIR / "verifier-headless"
MONITORING = COMPONENT_DIR / "monitoring"
NETWORK_POLICIES = COMPONENT_DIR / "network-policies"
OTHER_NAMESPACE = manifests.OTHER_NAMESPACE

# `volumes[].image` is in the API from 1.31 (the ImageVolume feature gate is on by default from 1.35).
MIN_IMAGE_VOLUME_VERSION = "1.31.0"


def write_kustomization(
    root: Path, resource: Path, components: tuple[Path, ...] = (), namespace: str | None = None
) -> None:
    root.mkdir(exist_ok=True)
    # kustomize takes other kustomizations by relative path only.
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(resource, root)],
        "components": [os.path.relpath(c, root) for c in components],
    }
    if namespace:
        kustomization["namespace"] = namespace
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))


def kustomize_over(
    resource: Path, components: tuple[Path, ...] = (), namespace: str | None = None, namespace_below: bool = False
) -> list[dict]:
    """`resource` (the base or an overlay) with `components`, in a kustomization of its own, as a
    user's overlay would use them; `namespace` set there, or (`namespace_below`) in a kustomization
    of its own under it, so that the components see the namespace already set."""
    with tempfile.TemporaryDirectory() as root:
        top = Path(root)
        if namespace and namespace_below:
            write_kustomization(top / "namespace", resource, namespace=namespace)
            resource, namespace = top / "namespace", None
        write_kustomization(top / "top", resource, components, namespace)
        return kustomize(top / "top")


RENDERS = {
    "models-pvc": lambda: kustomize_over(BASE, (MODELS_PVC,)),
    "models-image-volume": lambda: kustomize_over(BASE, (MODELS_IMAGE_VOLUME,)),
    "llama-8b": lambda: kustomize(LLAMA),
    "autoscaling-hpa": lambda: kustomize_over(BASE, (AUTOSCALING_HPA,)),
    "autoscaling-keda": lambda: kustomize_over(BASE, (AUTOSCALING_KEDA,)),
    # Autoscaling in another namespace, on the GPU overlay, behind the NetworkPolicies. The namespace
    # is set below the kustomization that adds the component, as k8s/README.md says: KEDA's queries
    # name it, and the adapter's rules stay in the adapter's namespace.
    "autoscaling-hpa-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_HPA, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
    "autoscaling-keda-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_KEDA, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
    "monitoring": lambda: kustomize_over(BASE, (MONITORING,)),
    "monitoring-other": lambda: kustomize_over(BASE, (MONITORING,), OTHER_NAMESPACE),
}
# Renders that use `volumes[].image`, and so validate only from MIN_IMAGE_VOLUME_VERSION.
IMAGE_VOLUME_RENDERS = {"models-image-volume"}

_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    """A render of RENDERS, or of test_manifests.py's own (shared with it, rendered once)."""
    if name not in RENDERS:
        return manifests.rendered(name)
    if name not in _rendered:
        _rendered[name] = RENDERS[name]()
    return _rendered[name]


def find_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(objects: list[dict], component: str) -> dict:
    return manifests.find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]


# --- validation ------------------------------------------------------------------------


def _key(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True)


_validated_by_manifests: set[str] = set()


def new_objects(objects: list[dict]) -> list[dict]:
    """The objects of a render that test_manifests.py does not already validate (unchanged ones
    are checked there, for every version)."""
    if not _validated_by_manifests:
        _validated_by_manifests.update(_key(o) for name in KUSTOMIZATIONS for o in manifests.rendered(name))
    return [o for o in objects if _key(o) not in _validated_by_manifests]


def validation_error(obj: dict, version: str) -> str | None:
    """None when `obj` validates strictly against `version`'s schema, else why not. Custom
    resources (no schema here) are left to the structural tests."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{obj['kind']}/{obj['metadata']['name']} invalid for {version} at {path}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError:
        if "." not in obj["apiVersion"].split("/")[0]:
            return f"{obj['kind']} {obj['apiVersion']}: no schema for a built-in kind in {version}"
    return None


def validation_errors(objects: list[dict], version: str) -> list[str]:
    """Why each of `objects` that does not validate strictly against `version` fails."""
    return [e for e in (validation_error(o, version) for o in objects) if e]


# --- mounts -------------------------------------------------------------------------------


def mount_holding(container: dict, path: str) -> dict | None:
    """The volumeMount that holds `path` (the deepest one), or None."""
    path = posixpath.normpath(path)
    holding = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"].rstrip("/") or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


# --- the real CLI -----------------------------------------------------------------------

_real: dict[tuple[str, str], dict] = {}


def parse_with_environment(args: list[str], env: dict[str, str]) -> dict:
    """The real `smartspec` parser's answer for `args` with exactly `env`'s SMARTSPEC_* variables (and
    this process's others), as test_manifests.real_parse gives it: {"ok": values} or {"error": text}.
    Here, not in a process of its own: this one has already imported most of what the parser
    imports, a new interpreter would import it all again."""
    from smartspec.cli import build_parser

    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update({k: v for k, v in saved.items() if not k.startswith("SMARTSPEC_")})
        os.environ.update(env)
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                return {"ok": vars(build_parser().parse_args(args))}
        except SystemExit:
            return {"error": errors.getvalue()}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def real(name: str, component: str) -> dict:
    """The real parser's answer for a container of a render here (its args and environment)."""
    if (name, component) not in _real:
        config = effective(rendered(name), component)
        _real[name, component] = parse_with_environment(config.args, config.env)
    return _real[name, component]
