import textwrap

import pytest

from lcha.cli import main
from lcha.config import ConfigError, load_config, parse_config, parse_duration

MINIMAL = {"backends": [{"name": "gpu0", "url": "http://127.0.0.1:8081"}]}


def write(tmp_path, text):
    path = tmp_path / "lcha.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_full_example_parses(tmp_path):
    path = write(
        tmp_path,
        """
        listen: 127.0.0.1:8080
        api_keys: [sk-one, sk-two]
        backends:
          - name: gpu0
            url: http://127.0.0.1:8081
            api_key: backend-secret
            slots: 4
            models: [qwen-7b]
        queue:
          max_size: 256
          timeout: 60s
        routing:
          policy: least_busy
          affinity_ttl: 10m
        health:
          interval: 2s
          timeout: 2s
          rise: 2
          fall: 3
        timeouts:
          connect: 3s
          first_byte: 600s
          idle: 120s
        """,
    )
    config = load_config(path, environ={})
    assert config.listen_host == "127.0.0.1"
    assert config.listen_port == 8080
    assert config.api_keys == ("sk-one", "sk-two")
    assert config.backends[0].slots == 4
    assert config.backends[0].models == ("qwen-7b",)
    assert config.backends[0].api_key == "backend-secret"
    assert config.queue.timeout == 60.0
    assert config.routing.affinity_ttl == 600.0
    assert config.timeouts.first_byte == 600.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("10m", 600.0), ("1h", 3600.0), (3, 3.0), ("1.5s", 1.5)],
)
def test_duration_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("listen", ["[::1]:8080", "::1:8080"])
def test_listen_ipv6(listen):
    if listen == "::1:8080":
        with pytest.raises(ConfigError, match=r"\[::1\]:8080"):
            parse_config({**MINIMAL, "listen": listen}, environ={})
        return
    config = parse_config({**MINIMAL, "listen": listen}, environ={})
    assert config.listen_host == "::1"
    assert config.listen == "[::1]:8080"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "bogus": 1}, "top level: unknown key(s) 'bogus'"),
        (
            {"backends": [{"name": "a", "url": "http://x:1", "slot": 2}]},
            "backends[0]: unknown key(s) 'slot'",
        ),
        (
            {"backends": [{"name": "a", "url": "http://x:1"}, {"name": "b", "url": "htp://x"}]},
            "backends[1].url: 'htp://x' is not an http(s) URL",
        ),
        (
            {"backends": [{"name": "a", "url": "http://x:1"}, {"name": "a", "url": "http://x:2"}]},
            "backends[1].name: duplicate backend name 'a'",
        ),
        ({**MINIMAL, "queue": {"timeout": "soon"}}, "queue.timeout: 'soon' is not a duration"),
        ({**MINIMAL, "queue": {"max_size": "10"}}, "queue.max_size: expected an integer"),
        ({**MINIMAL, "routing": {"policy": "fastest"}}, "routing.policy: 'fastest' is not one of"),
        ({**MINIMAL, "health": {"rise": 0}}, "health.rise: 0 must be at least 1"),
        ({**MINIMAL, "listen": "localhost"}, "listen: 'localhost' is not host:port"),
        ({"backends": [{"name": "a"}]}, "backends[0].url: missing required key"),
        ({**MINIMAL, "max_body_size": "big"}, "max_body_size: 'big' is not a size"),
    ],
)
def test_invalid_config_names_path(data, message):
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ={})
    assert message in str(info.value)


def test_env_overrides():
    env = {"LCHA_LISTEN": "[::1]:9000", "LCHA_API_KEYS": "k1, k2,"}
    config = parse_config({**MINIMAL, "api_keys": ["file-key"]}, environ=env)
    assert config.listen_host == "::1"
    assert config.listen_port == 9000
    assert config.api_keys == ("k1", "k2")


def test_lcha_config_env_selects_file(tmp_path):
    path = write(tmp_path, "backends: [{url: 'http://127.0.0.1:9'}]\n")
    config = load_config(None, environ={"LCHA_CONFIG": str(path)})
    assert config.backends[0].name == "127.0.0.1:9"


def test_api_keys_file_with_credentials_dir(tmp_path):
    (tmp_path / "api_keys").write_text("# comment\nsk-a\n\n  sk-b  \n")
    config = parse_config(
        {**MINIMAL, "api_keys_file": "${CREDENTIALS_DIRECTORY}/api_keys"},
        environ={"CREDENTIALS_DIRECTORY": str(tmp_path)},
    )
    assert config.api_keys == ("sk-a", "sk-b")


def test_api_keys_file_unset_variable():
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        parse_config({**MINIMAL, "api_keys_file": "${CREDENTIALS_DIRECTORY}/k"}, environ={})


def test_missing_file_message(tmp_path):
    with pytest.raises(ConfigError, match="not found; pass -c FILE or set LCHA_CONFIG"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_check_config_valid(tmp_path, capsys):
    path = write(tmp_path, "backends: [{name: a, url: 'http://127.0.0.1:9'}]\n")
    assert main(["--check-config", "-c", str(path)]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_check_config_invalid(tmp_path, capsys):
    path = write(tmp_path, "backends: [{name: a, url: 'htp://x'}]\n")
    assert main(["--check-config", "-c", str(path)]) == 1
    assert "backends[0].url: 'htp://x' is not an http(s) URL" in capsys.readouterr().err


def test_default_path_missing_is_reported(monkeypatch, capsys):
    monkeypatch.delenv("LCHA_CONFIG", raising=False)
    monkeypatch.setattr("lcha.cli.DEFAULT_CONFIG_PATH", "/nonexistent/lcha.yaml")
    assert main(["--check-config"]) == 1
    assert "'/nonexistent/lcha.yaml' not found" in capsys.readouterr().err


def test_no_backends_rejected():
    with pytest.raises(ConfigError, match="backends: at least one backend is required"):
        parse_config({"log_level": "debug"}, environ={})


def test_url_ending_in_v1_rejected():
    with pytest.raises(ConfigError, match=r"ends in /v1; give the server's base URL"):
        parse_config({"backends": [{"url": "http://127.0.0.1:8081/v1"}]}, environ={})


def test_duplicate_yaml_key_rejected(tmp_path):
    path = write(
        tmp_path,
        """
        backends: [{name: a, url: 'http://127.0.0.1:1'}]
        backends: [{name: b, url: 'http://127.0.0.1:2'}]
        """,
    )
    with pytest.raises(ConfigError, match="duplicate key 'backends'"):
        load_config(path, environ={})
