"""Checks for the files operators install: systemd unit, alert rules, dashboard."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "lcha.service"
ALERTS = ROOT / "etc" / "prometheus" / "lcha-alerts.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "lcha-dashboard.json"

INSTALLED_EXECUTABLE = "/usr/local/bin/lcha"
TOOL_TIMEOUT = 60

# Metric names exported by lcha.metrics. Histograms appear in queries only
# with the _bucket, _sum or _count suffix of their series.
PLAIN_METRICS = frozenset(
    {
        "lcha_requests_total",
        "lcha_responses_total",
        "lcha_queue_length",
        "lcha_prompt_tokens_total",
        "lcha_completion_tokens_total",
        "lcha_prompt_tokens_cached_total",
        "lcha_backend_slots",
        "lcha_backend_slots_busy",
        "lcha_backend_state",
        "lcha_dispatches_total",
        "lcha_retries_total",
        "lcha_rejections_total",
        "lcha_upstream_errors_total",
        "lcha_client_aborts_total",
        "lcha_config_reloads_total",
        "lcha_build_info",
        "lcha_model_loads_total",
        "lcha_backend_models_loaded",
        "lcha_queue_skips_total",
        "lcha_prefix_lookups_total",
        "lcha_prefix_cache_outcomes_total",
    }
)
HISTOGRAM_METRICS = frozenset(
    {
        "lcha_queue_wait_seconds",
        "lcha_time_to_first_byte_seconds",
        "lcha_request_duration_seconds",
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\blcha_[a-z_]+")

# Values substituted for Grafana variables so that promtool can parse the
# dashboard queries.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$instance": ".*",
    "$backend": ".*",
}


def unknown_metrics(expr):
    unknown = set()
    for name in METRIC_NAME.findall(expr):
        if name in PLAIN_METRICS:
            continue
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                base = name.removesuffix(suffix)
                break
        if base == name or base not in HISTOGRAM_METRICS:
            unknown.add(name)
    return unknown


def require_tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found in PATH; install it to check the ops files")
    return path


def run_tool(args, cwd):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


@pytest.fixture
def unit_copy(tmp_path):
    # systemd-analyze rejects an ExecStart= that does not exist, and lcha is
    # not installed on a test machine, so the copy starts this Python instead.
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_EXECUTABLE} " in text
    path = tmp_path / "lcha.service"
    path.write_text(text.replace(INSTALLED_EXECUTABLE, sys.executable))
    return path


@pytest.fixture
def alert_rules():
    return yaml.safe_load(ALERTS.read_text())


@pytest.fixture
def dashboard():
    return json.loads(DASHBOARD.read_text())


def alert_exprs(rules):
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def dashboard_panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard):
    exprs = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"])
    return exprs


def test_unit_verify(unit_copy):
    require_tool("systemd-analyze")

    result = run_tool(["systemd-analyze", "verify", str(unit_copy)], unit_copy.parent)

    # verify exits 0 on unknown keys and invalid values, which it only logs,
    # so any message about the unit file counts as a failure.
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert unit_copy.name not in output, output


def test_unit_security_exposure(unit_copy):
    require_tool("systemd-analyze")

    # The threshold is 10 times the printed exposure level, so 20 means 2.0
    # on the 0 to 10 scale.
    result = run_tool(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit_copy)],
        unit_copy.parent,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_memory_deny_write_execute(tmp_path):
    # MemoryDenyWriteExecute=yes is a seccomp filter that only systemd sets
    # up. The kernel's PR_SET_MDWE (Linux >= 6.3, kept across execve) rejects
    # the same writable and executable mappings. A fresh interpreter that runs
    # aiohttp, PyYAML and prometheus-client under it shows that the unit
    # setting does not break lcha's runtime stack.
    # NOTE: systemd also rejects mprotect() with PROT_EXEC on memory that is
    # already executable, which PR_SET_MDWE allows.
    child = textwrap.dedent("""
        import asyncio
        import mmap

        import aiohttp
        import prometheus_client
        import yaml
        from aiohttp import web

        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except OSError:
            pass
        else:
            raise SystemExit("writable and executable mapping was allowed")

        yaml.load("listen: 127.0.0.1:8080", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        prometheus_client.generate_latest()

        async def handle(request):
            return web.json_response({"ok": True})

        async def main():
            app = web.Application()
            app.router.add_get("/", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        assert response.status == 200
                        assert await response.json() == {"ok": True}
            finally:
                await runner.cleanup()

        asyncio.run(main())
        print("ok")
    """)
    launcher = textwrap.dedent("""
        import ctypes
        import os
        import sys

        PR_SET_MDWE = 65
        PR_MDWE_REFUSE_EXEC_GAIN = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            print(f"prctl(PR_SET_MDWE) failed errno={ctypes.get_errno()}")
            sys.exit(77)
        os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """)

    result = run_tool([sys.executable, "-c", launcher, child], tmp_path)

    if result.returncode == 77:
        pytest.skip(f"kernel does not support PR_SET_MDWE: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"


def test_alert_rules_check():
    require_tool("promtool")

    result = run_tool(
        ["promtool", "check", "rules", "--lint=all", "--lint-fatal", str(ALERTS)], ROOT
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire(tmp_path):
    require_tool("promtool")
    tests = tmp_path / "lcha-alerts.test.yml"
    tests.write_text(ALERT_TESTS.replace("RULE_FILE", str(ALERTS)))

    result = run_tool(["promtool", "test", "rules", str(tests)], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_metric_names(alert_rules):
    for expr in alert_exprs(alert_rules):
        assert unknown_metrics(expr) == set(), expr


def test_alert_rules_labels(alert_rules):
    for group in alert_rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]


def test_dashboard_metric_names(dashboard):
    exprs = dashboard_exprs(dashboard)

    assert exprs
    for expr in exprs:
        assert unknown_metrics(expr) == set(), expr


def test_dashboard_queries_parse(dashboard, tmp_path):
    require_tool("promtool")
    rules = []
    for index, expr in enumerate(dashboard_exprs(dashboard)):
        if expr.startswith("label_values("):
            continue
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = run_tool(["promtool", "check", "rules", str(path)], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_schema(dashboard):
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "lcha-overview"
    assert dashboard.get("id") is None


def test_dashboard_variables(dashboard):
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["backend"]["type"] == "query"
    assert "backend" in variables["backend"]["query"]
    assert variables["backend"]["multi"] is True
    assert variables["instance"]["type"] == "query"


def test_dashboard_datasource_variable(dashboard):
    expected = {"type": "prometheus", "uid": "${datasource}"}

    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]


def test_dashboard_panel_ids_unique(dashboard):
    ids = [panel["id"] for panel in dashboard_panels(dashboard)]

    assert len(ids) == len(set(ids))


def test_dashboard_layout_no_overlap(dashboard):
    cells = {}
    for panel in dashboard_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# promtool unit tests: series values are per 1m step, so "0+10x30" is a
# counter rising by 10 a minute for 30 minutes.
ALERT_TESTS = """
rule_files:
  - RULE_FILE
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="lcha", instance="lb:8080"}'
        values: '1 0x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: LchaDown
        exp_alerts:
          - exp_labels: {severity: critical, job: lcha, instance: "lb:8080"}
            exp_annotations:
              summary: "lcha on lb:8080 is down"
              description: "Prometheus has failed to scrape lcha on lb:8080 for 2 minutes."

  - interval: 1m
    input_series:
      - series: 'lcha_build_info{job="lcha", instance="a:8080", version="0.1.0", python="3.11"}'
        values: '1x10'
      - series: 'lcha_backend_state{job="lcha", instance="a:8080", backend="b1", state="healthy"}'
        values: '0x10'
      - series: 'lcha_build_info{job="lcha", instance="b:8080", version="0.1.0", python="3.11"}'
        values: '1x10'
      - series: 'lcha_backend_state{job="lcha", instance="b:8080", backend="b1", state="unhealthy"}'
        values: '1x10'
      - series: 'lcha_build_info{job="lcha", instance="c:8080", version="0.1.0", python="3.11"}'
        values: '1x10'
      - series: 'lcha_backend_state{job="lcha", instance="c:8080", backend="b1", state="healthy"}'
        values: '1x10'
      - series: 'lcha_backend_state{job="lcha", instance="c:8080", backend="b2", state="healthy"}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 5m
        alertname: LchaNoHealthyBackend
        exp_alerts:
          - exp_labels: {severity: critical, job: lcha, instance: "a:8080"}
            exp_annotations:
              summary: "lcha on a:8080 has no healthy backend"
              description: "Requests on a:8080 wait in the queue or are rejected
                until a backend becomes healthy."
          - exp_labels: {severity: critical, job: lcha, instance: "b:8080"}
            exp_annotations:
              summary: "lcha on b:8080 has no healthy backend"
              description: "Requests on b:8080 wait in the queue or are rejected
                until a backend becomes healthy."

  - interval: 1m
    input_series:
      - series: 'lcha_queue_wait_seconds_bucket{job="lcha", instance="a:8080", model="m", le="10"}'
        values: '0x30'
      - series: 'lcha_queue_wait_seconds_bucket{job="lcha", instance="a:8080", model="m", le="60"}'
        values: '0+10x30'
      - series: 'lcha_queue_wait_seconds_bucket{job="lcha", instance="a:8080", model="m", le="+Inf"}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: LchaQueueWaitHigh
        exp_alerts: []
      - eval_time: 20m
        alertname: LchaQueueWaitHigh
        exp_alerts:
          - exp_labels: {severity: warning, job: lcha, instance: "a:8080"}
            exp_annotations:
              summary: "lcha on a:8080 queues requests for long"
              description: "The 95th percentile queue wait is 57.5s. Add backends or slots, or lower the load."

  - interval: 1m
    input_series:
      - series: 'lcha_requests_total{job="lcha", instance="a:8080", route="/v1/chat/completions", model="m"}'
        values: '0+100x20'
      - series: 'lcha_rejections_total{job="lcha", instance="a:8080", reason="queue_full"}'
        values: '0+10x20'
      - series: 'lcha_rejections_total{job="lcha", instance="a:8080", reason="queue_timeout"}'
        values: '0+1x20'
      - series: 'lcha_rejections_total{job="lcha", instance="a:8080", reason="unauthorized"}'
        values: '0+50x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: LchaRejectionsRising
        exp_alerts:
          - exp_labels: {severity: warning, job: lcha, instance: "a:8080", reason: queue_full}
            exp_annotations:
              summary: "lcha on a:8080 rejects requests: queue_full"
              description: "10% of requests are rejected with reason queue_full."

  - interval: 1m
    input_series:
      - series: 'lcha_backend_state{job="lcha", instance="a:8080", backend="b1", state="healthy"}'
        values: '1 1 0 1 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'lcha_backend_state{job="lcha", instance="a:8080", backend="b2", state="healthy"}'
        values: '1 1 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
    alert_rule_test:
      - eval_time: 10m
        alertname: LchaBackendFlapping
        exp_alerts:
          - exp_labels: {severity: warning, job: lcha, instance: "a:8080", backend: b1, state: healthy}
            exp_annotations:
              summary: "Backend b1 on a:8080 is flapping"
              description: "Backend b1 changed its healthy state 4 times in 15 minutes.
                Check the backend and the health timeout, rise and fall settings."
      - eval_time: 30m
        alertname: LchaBackendFlapping
        exp_alerts: []

  - interval: 1m
    input_series:
      - series: 'lcha_dispatches_total{job="lcha", instance="a:8080", backend="b1", model="m"}'
        values: '0+100x20'
      - series: 'lcha_upstream_errors_total{job="lcha", instance="a:8080", backend="b1", kind="reset"}'
        values: '0+10x20'
      - series: 'lcha_dispatches_total{job="lcha", instance="a:8080", backend="b2", model="m"}'
        values: '0+100x20'
      - series: 'lcha_upstream_errors_total{job="lcha", instance="a:8080", backend="b2", kind="reset"}'
        values: '0+1x20'
    alert_rule_test:
      - eval_time: 15m
        alertname: LchaUpstreamErrors
        exp_alerts:
          - exp_labels: {severity: warning, job: lcha, instance: "a:8080", backend: b1, kind: reset}
            exp_annotations:
              summary: "Backend b1 on a:8080 returns reset errors"
              description: "10% of dispatches to b1 end with reset."

  - interval: 1m
    input_series:
      - series: 'lcha_config_reloads_total{job="lcha", instance="a:8080", result="failure"}'
        values: '0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1'
      - series: 'lcha_config_reloads_total{job="lcha", instance="a:8080", result="success"}'
        values: '0+1x30'
    alert_rule_test:
      - eval_time: 5m
        alertname: LchaConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: lcha, instance: "a:8080", result: failure}
            exp_annotations:
              summary: "lcha on a:8080 rejected a config reload"
              description: "lcha keeps running with the previous config.
                The journal (journalctl -u lcha) contains the validation error."
      - eval_time: 30m
        alertname: LchaConfigReloadFailed
        exp_alerts: []
"""
