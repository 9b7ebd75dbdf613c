"""The deployment files parse, point at code that exists, and query only metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from ray.serve import Application

from specasr_vllm.server.metrics import metric_names
from specasr_vllm.server.ray_app import DEPLOYMENT, app_builder

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def dashboard_metrics(prefix: str) -> set[str]:
    """The series the Grafana dashboard queries, with its ``$prefix`` variable set to ``prefix``."""
    dashboard = json.loads((DEPLOY / "grafana" / "specasr-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return {prefix + name for expr in exprs for name in re.findall(r"\$\{prefix\}([a-zA-Z0-9_]+)", expr)}


def test_dashboard_queries_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "specasr-dashboard.json").read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("latency", "real-time factor", "acceptance", "throughput", "queue", "errors"):
        assert topic in titles
    prefixes = {o["value"] for v in dashboard["templating"]["list"] if v["name"] == "prefix" for o in v["options"]}
    assert prefixes == {"specasr:", "ray_specasr_"}
    queried = dashboard_metrics("specasr:")
    assert len(queried) >= 10 and queried <= metric_names(), queried - metric_names()


def _serve_apps(config: dict) -> list[dict]:
    apps = config["applications"]
    assert [a["import_path"] for a in apps] == ["specasr_vllm.server.ray_app:app_builder"]
    assert apps[0]["deployments"][0]["name"] == DEPLOYMENT
    scaling = apps[0]["deployments"][0]["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    return apps


def test_serve_config_builds_the_application():
    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    app = _serve_apps(config)[0]
    assert isinstance(app_builder({k: str(v) for k, v in app["args"].items()}), Application)


def test_kuberay_rayservice():
    manifest = yaml.safe_load((DEPLOY / "kuberay-rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    app = _serve_apps(yaml.safe_load(manifest["spec"]["serveConfigV2"]))[0]
    assert app["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
    assert (app["args"]["device"], app["args"]["dtype"], app["args"]["method"]) == ("cuda", "float16", "specasr")
    assert isinstance(app_builder({k: str(v) for k, v in app["args"].items()}), Application)
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_prometheus_config_scrapes_ray_and_the_server():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert jobs["specasr"]["metrics_path"] == "/metrics"
    assert "ray-kubernetes" in jobs


def test_app_builder_rejects_unknown_arguments():
    import pytest

    from specasr_vllm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"unknown argument\(s\) \['modle'\]"):
        app_builder({"modle": "whisper-base"})
