"""Your own models (k8s/components/models-pvc, k8s/components/models-image-volume and the example
overlay k8s/overlays/llama-8b): rendered, validated offline, every setting parsed by the real CLI,
the weights mounted read-only where the settings point.

No cluster, storage or registry here: whether a claim or an image holds a loadable model is for
the pods to find out at start (they fail to start, with the path in the error).
"""

import os
import re
from functools import cache

import pytest

from tests.k8s.renders import (
    IMAGE_VOLUME_RENDERS,
    LLAMA,
    MIN_IMAGE_VOLUME_VERSION,
    mount_holding,
    new_objects,
    parse_with_environment,
    pod_spec,
    real,
    rendered,
    validation_error,
    validation_errors,
)
from tests.k8s.test_manifests import (
    COMPONENTS,
    K8S,
    MODEL_SERVERS,
    VALIDATED_VERSIONS,
    component_container,
    effective,
    find,
    kustomize,
    needs_kubectl,
    project_version,
)

MODEL_RENDERS = ("models-pvc", "models-image-volume", "llama-8b")
# The setting that names each model server's model.
MODEL_SETTING = {"verifier": "SMARTSPEC_MODEL", "proposer": "SMARTSPEC_DRAFT"}
CLAIM = "smartspec-models"
# What the example overlay serves, as directories on the claim.
LLAMA_TARGET = "/models/Llama-3.1-8B-Instruct"
LLAMA_DRAFT = "/models/Llama-3.2-1B-Instruct"
GIB = 1 << 30


def versions_for(name: str) -> tuple[str, ...]:
    if name in IMAGE_VOLUME_RENDERS:
        return (MIN_IMAGE_VOLUME_VERSION, *VALIDATED_VERSIONS[1:])
    return VALIDATED_VERSIONS


@needs_kubectl
@pytest.mark.parametrize(
    ("name", "version"), [(name, version) for name in MODEL_RENDERS for version in versions_for(name)]
)
def test_model_renders_validate_strictly(name, version):
    objects = new_objects(rendered(name))
    assert objects, f"{name} changes nothing"
    errors = validation_errors(objects, version)
    assert not errors, errors


@needs_kubectl
def test_image_volumes_need_kubernetes_1_31():
    """The component's stated minimum: older API servers do not know `volumes[].image`."""
    verifier = [o for o in new_objects(rendered("models-image-volume")) if o["kind"] == "Deployment"]
    older = f"1.{int(MIN_IMAGE_VOLUME_VERSION.split('.')[1]) - 1}.0"
    assert verifier and all("'image' was unexpected" in (validation_error(o, older) or "") for o in verifier)
    readme = (K8S / "README.md").read_text()
    minimum = MIN_IMAGE_VOLUME_VERSION.rsplit(".", 1)[0]
    kustomization = (K8S / "components" / "models-image-volume" / "kustomization.yaml").read_text()
    for text in (readme, kustomization):
        assert re.search(rf"Kubernetes\s*(≥|>=)\s*{re.escape(minimum)}\b", text)


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", MODEL_RENDERS)
def test_real_cli_accepts_every_setting(name, component):
    """Every variable the container gets (ConfigMap keys and env) is a flag the real parser takes, with
    a value it takes, and means what the ConfigMap says."""
    parsed = real(name, component)
    config = effective(rendered(name), component)
    assert "ok" in parsed, f"{name} {component} settings {config.settings} are refused:\n{parsed['error']}"
    values = parsed["ok"]
    assert values["command"] == component
    if component in MODEL_SETTING:
        flag = MODEL_SETTING[component].removeprefix("SMARTSPEC_").lower()
        assert values[flag] == config.settings[MODEL_SETTING[component]]


def test_the_real_parser_reads_exactly_the_environment_it_is_given():
    """What the tests above rely on: the settings come from the container's environment, a key that
    names no flag is refused, and the test process's own environment is left as it was."""
    before = dict(os.environ)
    assert parse_with_environment(["verifier"], {"SMARTSPEC_MAX_NUM_SEQS": "3"})["ok"]["max_num_seqs"] == 3
    refused = parse_with_environment(["verifier"], {"SMARTSPEC_MAX_NUM_SEQ": "3"})
    assert "SMARTSPEC_MAX_NUM_SEQ names no flag" in refused["error"]
    assert parse_with_environment(["proposer"], {"SMARTSPEC_DRAFT": "/models/d"})["ok"]["draft"] == "/models/d"
    assert dict(os.environ) == before


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
@pytest.mark.parametrize("name", MODEL_RENDERS)
def test_models_are_mounted_read_only_where_the_settings_point(name, component):
    objects = rendered(name)
    container = component_container(objects, component)
    path = effective(objects, component).settings[MODEL_SETTING[component]]
    assert path.startswith("/models/"), f"{MODEL_SETTING[component]}={path!r} is not one of the mounted models"
    mount = mount_holding(container, path)
    assert mount, f"{path} is on no volume of the {component}: {container.get('volumeMounts')}"
    assert mount.get("readOnly") is True, mount
    volume = {v["name"]: v for v in pod_spec(objects, component)["volumes"]}[mount["name"]]
    if "persistentVolumeClaim" in volume:
        # Attached read-only as well: no replica can change what the others serve.
        assert volume["persistentVolumeClaim"] == {"claimName": CLAIM, "readOnly": True}
    else:
        assert set(volume) == {"name", "image"}, volume
        assert volume["image"]["reference"] and volume["image"]["pullPolicy"] == "IfNotPresent"
        # An image volume is the model itself: mounted whole, never a file of another model's image.
        assert mount["mountPath"] == path and "subPath" not in mount


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", MODEL_RENDERS + ("base", "gpu", "mtls"))
def test_every_path_in_the_settings_is_on_a_volume(name, component):
    """The image's own files are no place for weights, certificates or profiles: a path a setting names
    lies on a mounted volume."""
    objects = rendered(name)
    container = component_container(objects, component)
    paths = {k: v for k, v in effective(objects, component).settings.items() if v.startswith("/")}
    for variable, path in paths.items():
        assert mount_holding(container, path), f"{name} {component}: {variable}={path} is on no volume"
    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
    assert len(mounts) == len(set(mounts)), f"a path mounted twice: {mounts}"


@needs_kubectl
@pytest.mark.parametrize("name", MODEL_RENDERS)
def test_model_components_change_the_model_settings_and_volumes_alone(name):
    """The components add a volume and name the model; ports, probes, addresses and the controller
    stay as they were."""
    objects = rendered(name)
    under = rendered("gpu" if name == "llama-8b" else "base")
    # The example overlay also sizes the caches for its models, and names the target for HTTP clients.
    example = name == "llama-8b"
    verifier_extra = {"SMARTSPEC_KV_CACHE_TOKENS", "SMARTSPEC_MAX_MODEL_LEN", "SMARTSPEC_SERVED_MODEL_NAME"}
    expected = {
        "verifier": {"SMARTSPEC_MODEL"} | (verifier_extra if example else set()),
        "proposer": {"SMARTSPEC_DRAFT"}
        | ({"SMARTSPEC_KV_CACHE_TOKENS", "SMARTSPEC_MAX_MODEL_LEN"} if example else set()),
        "controller": set(),
    }
    for component in COMPONENTS:
        before, after = effective(under, component), effective(objects, component)
        differing = {k for k in before.env.keys() | after.env.keys() if before.env.get(k) != after.env.get(k)}
        assert differing == expected[component], f"{name} {component}: {sorted(differing)}"
        old, new = component_container(under, component), component_container(objects, component)
        for field in ("env", "ports", "startupProbe", "readinessProbe", "livenessProbe", "image"):
            assert old.get(field) == new.get(field), f"{name} {component}: {field} changed"
    assert pod_spec(objects, "controller") == pod_spec(under, "controller")


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_the_built_in_pair_stays_the_cpu_default(component):
    settings = effective(rendered("base"), component).settings
    assert settings[MODEL_SETTING[component]] == {"verifier": "smollm2", "proposer": "smollm2-draft"}[component]
    assert settings["SMARTSPEC_DEVICE"] == "cpu"
    assert not [
        m
        for m in component_container(rendered("base"), component)["volumeMounts"]
        if m["mountPath"].startswith("/models")
    ]


# What the example overlay's sizes rest on (the models' config.json): layers, KV heads, head size;
# weights in bfloat16.
LLAMA_KV_BYTES_PER_TOKEN = {"verifier": 2 * 32 * 8 * 128 * 2, "proposer": 2 * 16 * 8 * 64 * 2}
LLAMA_WEIGHT_BYTES = {"verifier": 8.03e9 * 2, "proposer": 1.24e9 * 2}
# The smallest GPU the overlay's comment promises the target fits on.
TARGET_GPU_BYTES = 40e9


def memory_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert match, text
    return int(match[1]) * units.get(match[2] or "", 1)


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_llama_overlay_serves_its_models_from_the_claim_on_gpus(component):
    objects = rendered("llama-8b")
    values = real("llama-8b", component)["ok"]
    assert (values["device"], values["dtype"]) == ("cuda", "bfloat16")
    assert values[MODEL_SETTING[component].removeprefix("SMARTSPEC_").lower()] == (
        LLAMA_TARGET if component == "verifier" else LLAMA_DRAFT
    )
    container = component_container(objects, component)
    assert container["image"] == f"smartspec:{project_version()}-cuda"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # The weights pass through host memory on their way to the GPU.
    memory = memory_bytes(container["resources"]["limits"]["memory"])
    assert memory == memory_bytes(container["resources"]["requests"]["memory"])
    assert memory > 1.5 * LLAMA_WEIGHT_BYTES[component], f"{memory / GIB:.0f} GiB for the weights' load"
    kv_bytes = values["kv_cache_tokens"] * LLAMA_KV_BYTES_PER_TOKEN[component]
    if component == "verifier":
        assert LLAMA_WEIGHT_BYTES[component] + kv_bytes < 0.85 * TARGET_GPU_BYTES
        # A request may hold a quarter of the cache, not all of it.
        assert values["max_model_len"] * 4 <= values["kv_cache_tokens"]


@needs_kubectl
def test_llama_overlay_captures_the_drafts_graphs_for_the_steps_its_verifiers_send():
    """The draft's graphs are captured at start-up up to its max_batch requests of max_model_len
    tokens: the verifiers' bounds, not its own 131,072-token context."""
    proposer, verifier = (real("llama-8b", c)["ok"] for c in ("proposer", "verifier"))
    assert (proposer["max_batch"], proposer["max_model_len"]) == (verifier["max_num_seqs"], verifier["max_model_len"])
    assert verifier["max_model_len"] is not None


def test_readme_tells_how_to_bring_your_own_model():
    text = (K8S / "README.md").read_text()
    for needle in ("components/models-pvc", "components/models-image-volume", "overlays/llama-8b", CLAIM,
                   "ReadOnlyMany", "ImageVolume"):  # fmt: skip
        assert needle in text, f"k8s/README.md says nothing of {needle}"


# --- the example's claim and the Job that fills it (k8s/overlays/llama-8b/models) -----------


@cache
def llama_models() -> list[dict]:
    return kustomize(LLAMA / "models")


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
def test_llama_claim_and_fill_job_validate_strictly(version):
    errors = validation_errors(llama_models(), version)
    assert not errors, errors


@needs_kubectl
def test_llama_fill_job_writes_what_the_overlay_serves():
    objects = llama_models()
    claim = find(objects, "PersistentVolumeClaim", CLAIM)
    # Written once by the Job, mounted by replicas on any node.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    job = find(objects, "Job", "smartspec-fill-models")
    served = rendered("llama-8b")
    assert claim["metadata"]["namespace"] == job["metadata"]["namespace"] == pod_namespace(served)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mount = mount_holding(container, "/models/x")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["persistentVolumeClaim"] == {"claimName": CLAIM} and not mount.get("readOnly")
    # REPO=DIRECTORY for each model; the directories are where the overlay's settings point.
    written = dict(argument.split("=", 1) for argument in container["args"])
    assert set(written.values()) == {LLAMA_TARGET, LLAMA_DRAFT}
    # The HTTP API answers to the target's Hub id, the one the Job downloads.
    served_name = real("llama-8b", "verifier")["ok"]["served_model_name"]
    assert written[served_name] == LLAMA_TARGET
    assert all(repo.rsplit("/", 1)[1] == directory.rsplit("/", 1)[1] for repo, directory in written.items())
    assert all(mount_holding(container, directory) is mount for directory in written.values())
    assert mount["mountPath"] == mount_holding(component_container(served, "verifier"), LLAMA_TARGET)["mountPath"]
    # The script is Python the image runs as it stands.
    assert container["command"][:2] == ["python", "-c"]
    compile(container["command"][2], "fill-models", "exec")
    # As the serving pods run: the files it writes are theirs to read. The namespace enforces the
    # restricted pod security standard.
    serving = pod_spec(served, "verifier")["securityContext"]
    assert {k: pod["securityContext"][k] for k in ("runAsUser", "runAsGroup")} == {
        k: serving[k] for k in ("runAsUser", "runAsGroup")
    }
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["image"] == f"smartspec:{project_version()}"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False


def pod_namespace(objects: list[dict]) -> str:
    return find(objects, "Deployment", COMPONENTS["verifier"])["metadata"]["namespace"]
