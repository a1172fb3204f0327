"""Deployment files: serve_configs/*.yaml pass Ray Serve's own schema and build the graph's
config; deploy/rayservice.yaml (KubeRay) embeds the production Serve config and passes the same
schema; cluster.yaml passes Ray's cluster-launcher schema (ray/autoscaler/ray-schema.json)."""

from __future__ import annotations

import json
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
    (app,) = schema.applications
    assert app.import_path == "leadre.serve:build_app"
    cfg = from_dict(ServeConfig, app.args)  # the builder's args are a valid ServeConfig
    assert cfg.generator.generation.num_gpus == deps_gpus(raw)  # the tier section matches its deployment
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    assert set(deps) == {"Matcher", "Generator"}  # two tiers; the Matcher is the HTTP ingress
    for d in deps.values():  # overload sheds instead of queueing forever
        assert d["max_queued_requests"] > 0
    if name == "local.yaml":
        assert raw["http_options"]["host"] == "127.0.0.1"
        assert deps["Generator"]["ray_actor_options"]["num_gpus"] == 0
        assert cfg.model_dir is None or not cfg.model_dir.startswith("/mnt")
    else:
        for tier in ("Matcher", "Generator"):
            assert "autoscaling_config" in deps[tier] and "num_replicas" not in deps[tier]
        assert deps["Matcher"]["autoscaling_config"]["min_replicas"] >= 1
        assert deps["Generator"]["ray_actor_options"]["num_gpus"] >= 1
        assert cfg.store_url.startswith("redis://")


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
        build_app({"generator": {"generation": {"top_k": 30, "beam_size": 20}}})
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
    schema, on pods that run Serve's high-throughput mode and get the admin token."""
    from ray.serve.schema import ServeDeploySchema

    docs = list(yaml.safe_load_all((REPO / "deploy" / "rayservice.yaml").read_text()))
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
        assert "secretKeyRef" in env["LEADRE_ADMIN_TOKEN"]["valueFrom"]
    gpu = [g for g in cluster["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and all(g["minReplicas"] <= g["maxReplicas"] for g in cluster["workerGroupSpecs"])
    # A broken embedded config is caught by the same schema check.
    bad = {**embedded, "applications": [{**embedded["applications"][0], "deployments": [
        {"name": "Matcher", "max_ongoing_requests": "many"}]}]}
    with pytest.raises(Exception):
        ServeDeploySchema.model_validate(bad)


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
