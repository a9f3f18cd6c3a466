"""lcha's /metrics checked by promtool and scraped by a real Prometheus server.

Both tests run `python -m lcha` as a subprocess in front of in-process fake
backends. They skip when the `promtool` or `prometheus` binary is missing
(Debian: `apt-get install prometheus`).
"""

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.processes import HOST, ServerProcess, free_port, start_lcha

API_KEY = "sk-metrics-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "a prompt long enough to be cached " * 4}]}
# Families that the traffic of drive_traffic() fills with at least one sample.
# lcha_model_loads_total, lcha_queue_skips_total and the prefix families need
# router-mode backends or the prefix policy, which this traffic does not use.
DRIVEN_FAMILIES = (
    "lcha_requests",
    "lcha_responses",
    "lcha_queue_length",
    "lcha_queue_wait_seconds",
    "lcha_time_to_first_byte_seconds",
    "lcha_request_duration_seconds",
    "lcha_prompt_tokens",
    "lcha_completion_tokens",
    "lcha_prompt_tokens_cached",
    "lcha_backend_slots",
    "lcha_backend_slots_busy",
    "lcha_backend_state",
    "lcha_dispatches",
    "lcha_retries",
    "lcha_rejections",
    "lcha_upstream_errors",
    "lcha_client_aborts",
    "lcha_config_reloads",
    "lcha_build_info",
)
PROMETHEUS_READY_TIMEOUT = 20.0
SCRAPE_WAIT_TIMEOUT = 20.0


def require_binary(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH; install Debian's prometheus package to run this test")
    return path


@pytest.fixture
async def lcha_process(fakes, tmp_path):
    backends = await fakes(2, slots=2)
    config = {
        "backends": [{"name": f"b{i}", "url": fake.url} for i, fake in enumerate(backends)],
        "health": {"interval": "200ms", "timeout": "1s", "rise": 1, "fall": 1},
        "api_keys": [API_KEY],
        "max_body_size": "64KiB",
    }
    server = await asyncio.to_thread(start_lcha, config, tmp_path, timeout=20.0)
    yield server
    await asyncio.to_thread(server.stop, 5.0)


async def drive_traffic(http, url):
    """Send requests that fill every metric family lcha can fill without router mode."""
    chat_url = url + "/v1/chat/completions"

    async def post(body, headers=AUTH, **kwargs):
        async with http.post(chat_url, headers=headers, **kwargs, json=body) as response:
            await response.read()
            return response.status

    statuses = {
        "ok": await post(CHAT),
        # The same prompt again is served partly from a slot's prompt cache.
        "cached": await post(CHAT),
        "stream": await post({**CHAT, "stream": True}),
        "unknown_model": await post({**CHAT, "model": "missing"}),
        "no_key": await post(CHAT, headers={}),
        "backend_500": await post({**CHAT, "fake": {"status": 500, "body": "boom"}}),
        # 503 before the first byte is retried once, then fails with 502.
        "backend_503": await post({**CHAT, "fake": {"status": 503, "body": "busy"}}),
    }
    async with http.post(chat_url, headers=AUTH, data=b"{not json") as response:
        statuses["bad_json"] = response.status
    async with http.post(chat_url, headers=AUTH, json={**CHAT, "pad": "x" * 70_000}) as response:
        statuses["too_large"] = response.status

    # A client that leaves mid-stream.
    slow = {**CHAT, "stream": True, "fake": {"event_delay": 0.05, "tokens": 100}}
    async with http.post(chat_url, headers=AUTH, json=slow) as response:
        await response.content.readline()
        response.close()
    return statuses


async def fetch_metrics(http, url):
    async with http.get(url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_promtool_accepts_metrics(lcha_process, http):
    promtool = require_binary("promtool")
    statuses = await drive_traffic(http, lcha_process.url)
    assert statuses == {
        "ok": 200,
        "cached": 200,
        "stream": 200,
        "unknown_model": 404,
        "no_key": 401,
        "backend_500": 500,
        "backend_503": 502,
        "bad_json": 400,
        "too_large": 413,
    }

    async def abort_counted():
        text = await fetch_metrics(http, lcha_process.url)
        return 'lcha_client_aborts_total{route="/v1/chat/completions",stage="streaming"} 1.0' in text

    await _wait_until(abort_counted, 5.0)
    text = await fetch_metrics(http, lcha_process.url)

    families = {family.name: family for family in text_string_to_metric_families(text)}
    empty = [name for name in DRIVEN_FAMILIES if not families[name].samples]
    assert empty == []
    result = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


async def _wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within timeout")
        await asyncio.sleep(0.05)


@pytest.fixture
async def prometheus(tmp_path):
    """Factory: `await prometheus(target_port)` runs Prometheus scraping lcha every second."""
    binary = require_binary("prometheus")
    processes: list[ServerProcess] = []

    async def start(target_port):
        port = free_port()
        config_path = tmp_path / "prometheus.yml"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "lcha", "static_configs": [{"targets": [f"{HOST}:{target_port}"]}]}
            ],
        }
        config_path.write_text(json.dumps(config))
        log_path = tmp_path / "prometheus.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={HOST}:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = ServerProcess("prometheus", process, port, log_path)
        processes.append(server)
        await asyncio.to_thread(server.wait_http, "/-/ready", timeout=PROMETHEUS_READY_TIMEOUT)
        return server

    yield start
    for server in processes:
        await asyncio.to_thread(server.stop, 10.0)


async def test_prometheus_scrapes_lcha(lcha_process, prometheus, http):
    server = await prometheus(lcha_process.port)
    await drive_traffic(http, lcha_process.url)

    deadline = time.monotonic() + SCRAPE_WAIT_TIMEOUT
    series = []
    while time.monotonic() < deadline:
        result = await query_prometheus(http, server, "lcha_requests_total")
        series = [
            entry
            for entry in result
            if entry["metric"].get("route") == "/v1/chat/completions"
            and float(entry["value"][1]) >= 2
        ]
        if series:
            break
        await asyncio.sleep(0.5)

    assert series, f"no lcha_requests_total series; Prometheus log:\n{server.log_tail()}"
    assert series[0]["metric"]["job"] == "lcha"
    assert series[0]["metric"]["instance"] == f"{HOST}:{lcha_process.port}"
    up = await query_prometheus(http, server, 'up{job="lcha"}')
    assert up[0]["value"][1] == "1"


async def query_prometheus(http, server, promql):
    """Run an instant query through Prometheus' HTTP API and return its result list."""
    query = urllib.parse.urlencode({"query": promql})
    # The shared client session does not decompress, and Prometheus gzips by default.
    headers = {"Accept-Encoding": "identity"}
    async with http.get(f"{server.url}/api/v1/query?{query}", headers=headers) as response:
        answer = await response.json()
    assert answer["status"] == "success"
    return answer["data"]["result"]

