"""Deployment files: serve_configs/*.yaml pass Ray Serve's own schema and build the graph's
config; deploy/rayservice.yaml (KubeRay) embeds the production Serve config and passes the same
schema; cluster.yaml passes Ray's cluster-launcher schema (ray/autoscaler/ray-schema.json).
Both are secure by default: no dashboard or job API without authentication, the admin token
from a Secret (a file re-read at each request) and never written in them, the admin routes on
their own port."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from leadre.config import ConfigError, from_dict
from leadre.serve import ServeConfig

REPO = Path(__file__).resolve().parents[2]


def serve_config(name: str) -> dict:
    return yaml.safe_load((REPO / "serve_configs" / name).read_text())


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_serve_configs_validate(name):
    from ray.serve.schema import ServeDeploySchema

    raw = serve_config(name)
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "leadre.serve:build_app"
    cfg = from_dict(ServeConfig, app.args)  # the builder's args are a valid ServeConfig
    assert cfg.generator.generation.num_gpus == deps_gpus(raw)  # the tier section matches its deployment
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    assert set(deps) == {"Matcher", "Generator"}  # two tiers; the Matcher is the HTTP ingress
    for d in deps.values():  # overload sheds instead of queueing forever
        assert d["max_queued_requests"] > 0
    if name == "local.yaml":
        assert len(schema.applications) == 1  # admin routes on the local port (127.0.0.1)
        assert raw["http_options"]["host"] == "127.0.0.1"
        assert deps["Generator"]["ray_actor_options"]["num_gpus"] == 0
        assert cfg.model_dir is None or not cfg.model_dir.startswith("/mnt")
    else:
        for tier in ("Matcher", "Generator"):
            assert "autoscaling_config" in deps[tier] and "num_replicas" not in deps[tier]
        assert deps["Matcher"]["autoscaling_config"]["min_replicas"] >= 1
        assert deps["Generator"]["ray_actor_options"]["num_gpus"] >= 1
        assert cfg.store_url.startswith("redis://")
        check_admin_app(raw)


def check_admin_app(raw: dict) -> None:
    """The production Serve config moves the admin routes off the public port: the matcher's
    ``admin_port`` is set (the public port answers 404 for /admin/*), and a second application
    (no route on Serve's HTTP port) runs one Admin replica on that port, on the head node, for
    the same application and store. No token is written in it."""
    from ray.serve.schema import ServeDeploySchema

    from leadre.serve.app import build_admin

    apps = {a["name"]: a for a in raw["applications"]}
    (main,) = [a for a in apps.values() if a["import_path"] == "leadre.serve:build_app"]
    (admin,) = [a for a in apps.values() if a["import_path"].endswith(":build_admin_app")]
    ServeDeploySchema.model_validate(raw)
    cfg = from_dict(ServeConfig, main["args"])
    admin_cfg = from_dict(ServeConfig, admin["args"])
    port = cfg.matcher.admin_port
    assert port is not None and port != raw["http_options"]["port"]
    assert admin["route_prefix"] is None  # nothing of it on the public port
    assert admin_cfg.app_name == main["name"] and admin_cfg.store_url == cfg.store_url
    for key in ("admin_port", "admin_host", "admin_token_file"):
        assert getattr(admin_cfg.matcher, key) == getattr(cfg.matcher, key), key
    assert cfg.matcher.admin_host in ("127.0.0.1", "::1", "localhost")
    (dep,) = admin["deployments"]
    assert dep["name"] == "Admin" and dep.get("num_replicas", 1) == 1
    assert "node:__internal_head__" in dep["ray_actor_options"]["resources"]
    for app in raw["applications"]:  # token literals never: each replica reads its own
        assert not app["args"].get("matcher", {}).get("admin_token")
    # The builder of the YAML's admin application gives the Admin deployment.
    built = build_admin(admin_cfg)._bound_deployment
    assert built.name == "Admin" and built.init_args[0].admin_port == port


def deps_gpus(raw: dict) -> float:
    (gen,) = [d for d in raw["applications"][0]["deployments"] if d["name"] == "Generator"]
    return gen["ray_actor_options"]["num_gpus"]


def test_builder_rejects_unknown_args():
    from leadre.serve.app import build_app

    with pytest.raises(ConfigError, match="unknown ServeConfig option"):
        build_app({"index_dri": "x"})
    with pytest.raises(ConfigError, match="unknown GeneratorConfig option"):
        build_app({"generator.ttl": "5"})
    with pytest.raises(ConfigError, match="top_k"):
        build_app({"generator": {"generation": {"top_k": 30, "beam_size": 20,
                                                 "ranking": "beam"}}})
    with pytest.raises(ConfigError, match="unknown ServeConfig option"):
        build_app({"ingress.k_max": "5"})  # the HTTP limits are the matcher's now


def test_tier_sections_are_the_deployment_options():
    """Each tier's section is the one source of its deployment options; a Serve config's
    ``deployments:`` entry (or build's ``options``) overrides them."""
    from leadre.serve import GeneratorConfig, MatcherConfig
    from leadre.serve.app import tier
    from leadre.serve.matcher import Matcher

    cfg = from_dict(ServeConfig, {"matcher": {"num_replicas": 3, "num_cpus": 0.5},
                                  "generator": {"generation": {"num_replicas": 2, "num_gpus": 0,
                                                               "batch_size": 8}}})
    opts = cfg.matcher.deployment_options()
    assert opts["num_replicas"] == 3 and opts["ray_actor_options"] == {"num_cpus": 0.5}
    gen_opts = cfg.generator.deployment_options()
    assert gen_opts["ray_actor_options"]["num_gpus"] == 0 and gen_opts["num_replicas"] == 2
    assert MatcherConfig().max_queued_requests > 0 and GeneratorConfig().max_queued_requests > 0
    with pytest.raises(ConfigError, match="max_drain_bytes"):
        MatcherConfig(max_body_bytes=1024, max_drain_bytes=512)
    dep = tier(Matcher, cfg.matcher)
    assert dep.num_replicas == 3 and dep.ray_actor_options["num_cpus"] == 0.5
    assert dep.max_ongoing_requests == MatcherConfig.max_ongoing_requests
    assert tier(Matcher, cfg.matcher, {"max_ongoing_requests": 7}).max_ongoing_requests == 7
    auto = {"min_replicas": 1, "max_replicas": 4}
    assert "num_replicas" not in MatcherConfig(autoscaling_config=auto).deployment_options()
    # Ray refuses num_replicas next to autoscaling_config: an autoscaling override replaces it.
    tier(Matcher, cfg.matcher, {"autoscaling_config": auto})
    with pytest.raises(ValueError):
        Matcher.options(num_replicas=3, autoscaling_config=auto)
    with pytest.raises(ConfigError, match="num_replicas"):
        MatcherConfig(num_replicas=0)


def test_rayservice_embeds_the_production_serve_config():
    """deploy/rayservice.yaml: a KubeRay RayService whose serveConfigV2 is
    serve_configs/production.yaml (parsed equal: they cannot drift), valid for Ray Serve's
    schema, on pods that run Serve's high-throughput mode."""
    from ray.serve.schema import ServeDeploySchema

    text = (REPO / "deploy" / "rayservice.yaml").read_text()
    docs = list(yaml.safe_load_all(text))
    (svc,) = docs
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == serve_config("production.yaml")
    schema = ServeDeploySchema.model_validate(embedded)
    assert schema.applications[0].import_path == "leadre.serve:build_app"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == __import__("ray").__version__
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for group in pods:
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"]["value"] == "1"
    gpu = [g for g in cluster["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] <= g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    # A broken embedded config is caught by the same schema check.
    bad = {**embedded, "applications": [{**embedded["applications"][0], "deployments": [
        {"name": "Matcher", "max_ongoing_requests": "many"}]}]}
    with pytest.raises(Exception):
        ServeDeploySchema.model_validate(bad)


def _containers(cluster: dict):
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        for container in spec["containers"]:
            yield group, spec, container


def test_rayservice_is_secure_by_default():
    """No dashboard or job API without authentication (Ray's token auth through KubeRay's
    authOptions, or a dashboard bound to loopback); the admin token only from a Kubernetes
    Secret, as a file the replica re-reads (so a rotated Secret applies without a redeploy)
    or an env var from a secretKeyRef, never a literal anywhere in the manifest; the admin
    routes on their own port (the production Serve config embedded, checked above)."""
    text = (REPO / "deploy" / "rayservice.yaml").read_text()
    svc = yaml.safe_load(text)
    cluster = svc["spec"]["rayClusterConfig"]

    # 1. The dashboard / job API: token authentication on, or not reachable off the pod.
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    auth = (cluster.get("authOptions") or {}).get("mode")
    loopback = head_params.get("dashboard-host") in ("127.0.0.1", "localhost", "::1")
    assert auth == "token" or loopback, "dashboard and job API open without authentication"
    for _, _, container in _containers(cluster):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value", "token") == "token"  # never disabled
        assert "RAY_AUTH_TOKEN" not in env or "valueFrom" in env["RAY_AUTH_TOKEN"]

    # 2. The admin token: from a Secret (volume + LEADRE_ADMIN_TOKEN_FILE, or secretKeyRef),
    #    on the pod where the Admin replica runs (the head), as no literal.
    head = cluster["headGroupSpec"]["template"]["spec"]
    (head_container,) = head["containers"]
    env = {e["name"]: e for e in head_container["env"]}
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    if "LEADRE_ADMIN_TOKEN_FILE" in env:
        path = Path(env["LEADRE_ADMIN_TOKEN_FILE"]["value"])
        (mount,) = [m for m in head_container["volumeMounts"]
                    if path.parent == Path(m["mountPath"])]
        assert "subPath" not in mount  # a subPath mount is never updated: no rotation
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] and path.name in (
            [i["path"] for i in secret.get("items", [])] or ["token"])
    else:
        assert "secretKeyRef" in env["LEADRE_ADMIN_TOKEN"]["valueFrom"]
    for _, _, container in _containers(cluster):
        for e in container.get("env", []):
            if "TOKEN" in e["name"] and e["name"] != "LEADRE_ADMIN_TOKEN_FILE":
                assert "value" not in e, f"{e['name']} is a literal"
    assert not re.search(r"(?m)^\s*admin_token\s*:", text)  # no token in the Serve config
    assert "stringData" not in text and "kind: Secret" not in text  # no Secret with the token

    # 3. The admin routes on their own port, served on the head (where the token is).
    check_admin_app(yaml.safe_load(svc["spec"]["serveConfigV2"]))


def test_cluster_yaml_is_secure_by_default():
    """`ray up`: the dashboard on the head's loopback only (reached through `ray dashboard`'s
    SSH tunnel), Ray's token authentication on every node with the token copied from the
    launching machine, the admin token as a file on the head (read at each request)."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (head_start,) = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    (worker_start,) = [c for c in cfg["worker_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for cmd in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmd
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert "LEADRE_ADMIN_TOKEN_FILE=" in head_start
    assert "LEADRE_ADMIN_TOKEN=" not in head_start  # no literal token in the launcher config


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(cfg, ray_schema())
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    cpu = [n for n in types if "cpu" in n]
    gpu = [n for n in types if "gpu" in n]
    assert cpu and gpu
    for n in cpu + gpu:
        assert 0 <= types[n]["min_workers"] <= types[n]["max_workers"]
    assert any(types[n]["max_workers"] > types[n]["min_workers"] for n in gpu)  # autoscaled


def test_ray_schema_catches_mistakes():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    bad = {**cfg, "max_wokers": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
    bad = {**cfg, "idle_timeout_minutes": "five"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, ray_schema())
