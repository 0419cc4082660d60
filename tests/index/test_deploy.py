"""deploy/docker-compose.yml cannot run here (no Docker): check it parses, is self-consistent, and
that the MemGuard commands it runs are ones this code base accepts."""
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_the_stack_has_every_part_and_references_resolve(compose):
    services = compose["services"]
    assert {"etcd", "minio", "milvus", "postgres", "memguard", "prometheus", "grafana"} <= set(services)
    assert services["memguard"]["deploy"]["replicas"] == "${MEMGUARD_REPLICAS:-3}"
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in compose["volumes"], (name, source)
            elif source.startswith("./"):
                assert (DEPLOY / source).exists(), (name, source)
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
    env = services["memguard"]["environment"]
    assert env["MEMGUARD_REGISTRY"].startswith("postgresql://") and env["MEMGUARD_MILVUS_URI"] == "milvus://milvus:19530"
    prometheus = yaml.safe_load(compose["configs"]["prometheus_config"]["content"])
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["memguard"]["dns_sd_configs"][0]["names"] == ["memguard"]
    assert (DEPLOY / "grafana" / "memguard-dashboard.json").is_file()


def test_the_commands_it_runs_parse_with_this_cli(compose):
    from memguard.cli import build_parser
    from memguard.index.backends import parse_backend

    parser = build_parser()
    for name in ("memguard", "migrate"):
        argv = compose["services"][name]["command"]
        assert argv[0] == "memguard"
        args = parser.parse_args(argv[1:])
        assert callable(args.func), name
    parse_backend(compose["services"]["memguard"]["environment"]["MEMGUARD_MILVUS_URI"])
