from __future__ import annotations

from pathlib import Path

import pytest

from rawgate.config import ConfigError, auth_mode, build_config, load_config


def test_defaults() -> None:
    cfg = load_config(env={"RAWGATE_HOME": "/nonexistent-rawgate-home"})
    assert cfg.server.port == 8045
    assert cfg.auth.mode == "auto"
    assert auth_mode(cfg) == "off"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('[server]\nport = 9001\nhost = "127.0.0.2"\n[auth]\napi_keys = ["k1"]\n')
    cfg = load_config(p, env={"RAWGATE_SERVER_PORT": "9002", "RAWGATE_AUTH_API_KEYS": "a, b"})
    assert cfg.server.port == 9002
    assert cfg.server.host == "127.0.0.2"
    assert cfg.auth.api_keys == ["a", "b"]
    cfg = load_config(p, env={"RAWGATE_SERVER_PORT": "9002"}, overrides={"server": {"port": 9003}})
    assert cfg.server.port == 9003


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"server": {"port": "abc"}}, "server.port = 'abc'"),
        ({"server": {"prot": 1}}, "unknown key server.prot"),
        ({"srever": {}}, "unknown section [srever]"),
        ({"auth": {"mode": "open"}}, "auth.mode = 'open'"),
        ({"server": {"port": 70000}}, "server.port = 70000"),
        ({"server": {"tls_cert": "a.pem"}}, "tls_cert and server.tls_key"),
        ({"limits": {"max_body_bytes": -1}}, "limits.max_body_bytes = -1"),
    ],
)
def test_bad_config_names_key_and_value(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(raw, {}, {})
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_env_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="RAWGATE_SERVER_PROT"):
        build_config({}, {"RAWGATE_SERVER_PROT": "1"}, {})


def test_every_config_key_is_documented_in_the_readme() -> None:
    import re
    from pathlib import Path

    import msgspec

    from rawgate.config import Config

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    sections = re.split(r"\n`\[(\w+)\]`\n", readme)
    documented = {sections[i]: sections[i + 1] for i in range(1, len(sections) - 1, 2)}
    for f in msgspec.structs.fields(Config):
        assert f.name in documented, f"README lacks the [{f.name}] table"
        for g in msgspec.structs.fields(f.type):
            assert f"| `{g.name}` |" in documented[f.name], f"README lacks {f.name}.{g.name}"


def test_upstream_urls_and_proxy_are_checked_without_echoing_credentials() -> None:
    import pytest

    from rawgate.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"upstream\.gemini_base_url"):
        build_config({"upstream": {"gemini_base_url": "generativelanguage.googleapis.com"}}, {}, {})
    with pytest.raises(ConfigError, match=r"upstream\.proxy") as ei:
        build_config({"upstream": {"proxy": "socks5://user:s3cret@host:1080"}}, {}, {})
    assert "s3cret" not in str(ei.value)
    cfg = build_config({"upstream": {"proxy": "http://user:pw@127.0.0.1:3128"}}, {}, {})
    assert cfg.upstream.proxy.endswith(":3128")


def test_errors_name_the_real_source(tmp_path: Path) -> None:
    flags = {("server", "port"): "--port"}
    with pytest.raises(ConfigError) as e:
        load_config(env={"RAWGATE_HOME": str(tmp_path)}, overrides={"server": {"port": 99999}},
                    flags=flags)  # fmt: skip
    assert str(e.value) == "--port: server.port = 99999: must be 0..65535"
    # No config.toml was read: the message must not name one.
    with pytest.raises(ConfigError) as e:
        load_config(env={"RAWGATE_HOME": str(tmp_path), "RAWGATE_SERVER_PORT": "abc"})
    assert str(e.value) == "RAWGATE_SERVER_PORT: server.port = 'abc': expected an integer"
    p = tmp_path / "config.toml"
    p.write_text('[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError) as e:
        load_config(env={"RAWGATE_HOME": str(tmp_path)})
    assert str(e.value) == f"{p}: log.level = 'loud': must be one of debug, info, warning, error"
    # The env beats the file; then it is the env that is wrong, not the file.
    p.write_text('[routing]\nscheduling = "sticky"\n')
    with pytest.raises(ConfigError, match=r"^RAWGATE_ROUTING_SCHEDULING: .* round_robin"):
        load_config(env={"RAWGATE_HOME": str(tmp_path), "RAWGATE_ROUTING_SCHEDULING": "x"})


def test_auth_on_without_keys_names_what_turned_it_on() -> None:
    with pytest.raises(ConfigError, match=r"^cfg.toml: auth.mode = 'strict' needs .*api_keys"):
        build_config({"auth": {"mode": "strict"}}, {}, {}, source="cfg.toml")
    with pytest.raises(ConfigError, match=r"^RAWGATE_SERVER_ALLOW_LAN_ACCESS: auth.mode = 'all_"):
        build_config({}, {"RAWGATE_SERVER_ALLOW_LAN_ACCESS": "true"}, {})
    with pytest.raises(ConfigError, match="empty key") as e:
        build_config({"auth": {"mode": "strict", "api_keys": ["sk-secret", " "]}}, {}, {})
    assert "sk-secret" not in str(e.value)
    assert build_config({"auth": {"mode": "strict", "api_keys": ["k"]}}, {}, {}).auth.mode


def test_split_reload_keeps_restart_settings_and_names_them() -> None:
    from rawgate.config import split_reload

    running = build_config({"server": {"port": 9000}}, {}, {})
    new = build_config(
        {
            "server": {"port": 9001, "cors_max_age_s": 5},
            "upstream": {"proxy": "http://127.0.0.1:3128"},
            "limits": {"max_connections": 7, "max_body_bytes": 1000},
            "routing": {"custom_mapping": {"a": "gemini-2.5-pro"}},
        },
        {},
        {},
    )
    applied, pending = split_reload(running, new)
    assert pending == ["server.port", "upstream.proxy", "limits.max_connections"]
    assert applied.server.port == 9000 and applied.server.cors_max_age_s == 5
    assert applied.upstream.proxy == "" and applied.limits.max_connections == 4096
    assert applied.limits.max_body_bytes == 1000
    assert applied.routing.custom_mapping == {"a": "gemini-2.5-pro"}
    assert split_reload(running, running) == (running, [])


def test_a_wrong_list_element_names_the_setting_and_hides_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"auth": {"api_keys": ["sk-secret-1", 3]}}, {}, {}, source="f.toml")
    assert str(e.value).startswith("f.toml: auth.api_keys: ")
    assert "sk-secret" not in str(e.value)


def test_a_missing_tls_file_is_named_with_its_flag(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    flags = {("server", "tls_cert"): "--tls-cert", ("server", "tls_key"): "--tls-key"}
    over = {"server": {"tls_cert": str(cert), "tls_key": str(tmp_path / "nope.pem")}}
    with pytest.raises(ConfigError) as e:
        build_config({}, {}, over, flags=flags)
    assert str(e.value) == f"--tls-key: server.tls_key = '{tmp_path / 'nope.pem'}': no such file"
