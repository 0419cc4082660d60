"""The Prometheus contract: naming, bounded labels, promtool on a live scrape and on the rules,
and that the Grafana dashboard and alert rules only query series the server exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from memguard.proto.memguard.v1 import memguard_pb2 as pb, memguard_pb2_grpc
from server_testlib import channel, scrape_text

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "memguard-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "memguard-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "memguard-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package "
                                    "`prometheus`; scripts/test.sh installs it in CI)")
METRIC_NAME = re.compile(r"(?<![:\w])memguard_[a-z0-9_]+(?![:\w])")   # not inside recording-rule names


@pytest.fixture(scope="module")
def live_scrape(server) -> str:
    with channel(server) as ch:
        stub = memguard_pb2_grpc.MemGuardStub(ch)
        stub.Generate(pb.GenerateRequest(prompt="secret prompt text", steps=2, request_id="req-unique-123"))
        list(stub.GenerateStream(pb.GenerateRequest(prompt="another", steps=2)))
    return scrape_text(server)


def families(text: str) -> dict[str, str]:
    """{family name: type} from the # TYPE lines."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def test_names_units_and_bounded_labels(live_scrape):
    fams = families(live_scrape)
    assert fams and all(name.startswith("memguard_") for name in fams)
    for name, kind in fams.items():
        if kind == "counter":
            assert name.endswith("_total"), name
        if "duration" in name or "wait" in name or "overhead" in name:
            assert name.endswith("_seconds"), name
    assert "memguard_build_info" in fams
    assert "secret prompt" not in live_scrape and "req-unique-123" not in live_scrape
    labels = set(re.findall(r"[{,]([a-z_]+)=", live_scrape))
    assert labels <= {"rpc", "code", "decision", "reason", "signal", "cause", "set", "operation", "outcome",
                      "le", "version", "engine", "guarded"}
    assert not re.search(r"^memguard_\w+_created", live_scrape, re.M)


@needs_promtool
def test_promtool_checks_a_live_scrape(live_scrape):
    run = subprocess.run([PROMTOOL, "check", "metrics"], input=live_scrape, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_checks_and_unit_tests_the_alert_rules():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr


def exported_names(text: str) -> set[str]:
    names = set()
    for name, kind in families(text).items():
        names.add(name)
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    return names


def test_dashboard_and_rules_query_only_exported_series(live_scrape):
    exported = exported_names(live_scrape)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 20
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rules = yaml.safe_load(RULES.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in METRIC_NAME.findall(e)}
    assert used - exported == set()
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"MemGuardQueueSaturated", "MemGuardGenerateLatencyP99High", "MemGuardBlockRateSpike",
            "MemGuardGuardUnavailable"} <= alerts
