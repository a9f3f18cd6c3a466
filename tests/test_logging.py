"""Log output of a real `python -m lcha` process: formats, levels, secrets, prompts."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e.processes import REPO_ROOT
from lcha import forward

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
FAST_HEALTH = {"interval": "100ms", "timeout": "1s", "rise": 1, "fall": 1}
DEFAULT_CONFIG = Path("/etc/lcha/lcha.yaml")


def config_for(fakes, **overrides):
    data = {
        "backends": [{"name": f"b{i}", "url": fake.url} for i, fake in enumerate(fakes)],
        "health": FAST_HEALTH,
    }
    data.update(overrides)
    return data


async def stopped_log(server):
    """Stop `server` and return its complete output, one entry per line."""
    assert await asyncio.to_thread(server.stop, 5.0) == 0
    return server.log_path.read_text().splitlines()


def access_lines(lines):
    return [line for line in lines if " lcha.access " in line]


def run_cli(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lcha", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def child_env(tmp_path, **extra):
    # Only what Python needs: no LCHA_* variable leaks in from the outer shell.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.update(extra)
    return env


# --- formats and levels ------------------------------------------------------------


async def test_json_format_one_access_line_each(fakes, spawn, http):
    server = await spawn(config_for(await fakes(1), log_format="json"))
    request_ids = [f"json-test-{i}" for i in range(3)]
    for request_id in request_ids:
        headers = {"X-Request-Id": request_id}
        async with http.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers):
            pass
    async with http.post(
        server.url + "/v1/chat/completions", json={**CHAT, "model": "absent"}
    ) as rejected:
        assert rejected.status == 404

    entries = [json.loads(line) for line in await stopped_log(server)]
    access = [entry for entry in entries if entry["logger"] == "lcha.access"]
    assert len(access) == 4
    for request_id in request_ids:
        matching = [e for e in access if f"request_id={request_id} " in e["message"]]
        assert len(matching) == 1
    assert {entry["level"] for entry in access} == {"info"}
    assert all(entry["time"].endswith("Z") for entry in entries)
    assert "status=404" in access[-1]["message"]


async def test_text_access_line_fields(fakes, spawn, http):
    server = await spawn(config_for(await fakes(1)))
    headers = {"X-Request-Id": "text-test-1"}
    async with http.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers):
        pass

    (line,) = access_lines(await stopped_log(server))
    fields = dict(part.split("=", 1) for part in line.split(" lcha.access request ", 1)[1].split())
    assert fields["request_id"] == "text-test-1"
    assert fields["route"] == "/v1/chat/completions"
    assert fields["backend"] == "b0"
    assert fields["status"] == "200"
    assert fields["outcome"] == "ok"
    assert " INFO " in line


async def test_log_level_reload(fakes, spawn, http):
    config = config_for(await fakes(1), log_level="warning")
    server = await spawn(config)
    async with http.post(server.url + "/v1/chat/completions", json=CHAT):
        pass
    assert access_lines(server.log_path.read_text().splitlines()) == []

    written = yaml.safe_load(server.config_path.read_text())
    server.config_path.write_text(yaml.safe_dump({**written, "log_level": "info", "log_format": "json"}))
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "config reloaded" not in server.log_path.read_text():
        assert time.monotonic() < deadline, "no 'config reloaded' line"
        await asyncio.sleep(0.05)
    async with http.post(server.url + "/v1/chat/completions", json=CHAT):
        pass

    lines = await stopped_log(server)
    assert not any(" INFO " in line for line in lines if not line.startswith("{"))
    access = [json.loads(line) for line in lines if '"lcha.access"' in line]
    assert len(access) == 1


# --- what must not be logged -------------------------------------------------------


async def test_secrets_never_logged(fakes, spawn, http):
    client_key = "sk-client-secret-4711"
    backend_key = "backend-secret-0815"
    wrong_key = "sk-wrong-guess-1234"
    prompt = "PROMPT-MARKER private words"
    (fake,) = await fakes(1, api_key=backend_key)
    config = config_for([fake], api_keys=[client_key], log_level="debug")
    config["backends"][0]["api_key"] = backend_key
    server = await spawn(config)
    chat_url = server.url + "/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 2}

    for headers in (
        {"Authorization": f"Bearer {client_key}"},
        {"X-Api-Key": client_key},
        {"Authorization": f"Bearer {wrong_key}"},
        {},
    ):
        async with http.post(chat_url, json=body, headers=headers):
            pass
    async with http.post(
        chat_url, json={**body, "stream": True}, headers={"X-Api-Key": client_key}
    ) as response:
        assert response.status == 200
        await response.read()
    tokenize_url = server.url + "/tokenize"
    async with http.post(tokenize_url, json={"content": prompt}, headers={"X-Api-Key": client_key}):
        pass

    text = "\n".join(await stopped_log(server))
    assert len(access_lines(text.splitlines())) == 6
    assert client_key not in text
    assert backend_key not in text
    assert wrong_key not in text
    assert "PROMPT-MARKER" not in text


async def test_log_prompts_excerpt(fakes, spawn, http):
    server = await spawn(config_for(await fakes(1), log_prompts=True))
    content = 'first line\nsecond "quoted" line ' + "x" * 300
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    async with http.post(server.url + "/v1/chat/completions", json=body):
        pass
    async with http.post(server.url + "/completion", json={"prompt": "short prompt", "n_predict": 2}):
        pass

    chat_line, completion_line = access_lines(await stopped_log(server))
    excerpt = json.loads(chat_line.split(" prompt=", 1)[1])
    assert excerpt == content[:200] + "..."
    assert completion_line.endswith(' prompt="short prompt"')


# --- rate limits -------------------------------------------------------------------


async def test_dead_backend_errors_rate_limited(fakes, spawn, http):
    alive, dead = await fakes(2)
    server = await spawn(config_for([alive, dead]))
    await dead.stop()
    # About 12 failed polls at interval 100ms, plus requests that may still
    # pick the dead backend before a poll notices.
    requests = 12
    for _ in range(requests):
        async with http.post(server.url + "/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
        await asyncio.sleep(0.1)

    lines = await stopped_log(server)
    dead_errors = [
        line for line in lines if "backend=b1" in line and (" WARNING " in line or " ERROR " in line)
    ]
    assert len(access_lines(lines)) == requests
    # The state change, the first three repeats and at most one retry.
    assert len(dead_errors) <= 5
    assert any("repeats=3" in line for line in dead_errors)


# --- configuration path ------------------------------------------------------------


def test_default_config_path_reported(tmp_path):
    if DEFAULT_CONFIG.exists():
        pytest.skip(f"{DEFAULT_CONFIG} exists on this machine, so lcha would use it")
    result = run_cli([], child_env(tmp_path), tmp_path)
    assert result.returncode == 1
    assert f"'{DEFAULT_CONFIG}' not found" in result.stderr
    assert "neither -c nor LCHA_CONFIG is set" in result.stderr


def test_lcha_config_variable_used(tmp_path):
    path = tmp_path / "from-env.yaml"
    path.write_text("backends: [{name: a, url: 'http://127.0.0.1:9'}]\n")
    result = run_cli(["--check-config"], child_env(tmp_path, LCHA_CONFIG=str(path)), tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: configuration is valid")


async def test_failing_backend_retries_rate_limited(fakes, spawn, http):
    good, failing = await fakes(2)
    failing.set_fault(routes=["/v1/chat/completions"], reset=True)
    server = await spawn(config_for([good, failing]))
    requests = 20
    for _ in range(requests):
        async with http.post(server.url + "/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200

    lines = await stopped_log(server)
    retries = [line for line in lines if "retrying on another backend" in line]
    assert failing.faults_applied["reset"] >= 2
    assert len(retries) == 1


def test_error_log_limiter_counts_skipped(monkeypatch):
    monkeypatch.setattr(forward, "ERROR_LOG_INTERVAL", 0.05)
    limiter = forward._ErrorLogLimiter()
    assert limiter.allow("b1", "reset") == 0
    assert limiter.allow("b1", "reset") is None
    assert limiter.allow("b1", "reset") is None
    assert limiter.allow("b1", "connect") == 0
    assert limiter.allow("b2", "reset") == 0
    time.sleep(0.06)
    assert limiter.allow("b1", "reset") == 2
    assert limiter.allow("b1", "reset") is None
