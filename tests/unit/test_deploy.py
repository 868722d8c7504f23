"""Static checks of the deployment files: Dockerfile, compose stack, Prometheus, Grafana.

No Docker engine is needed: the files are parsed and cross-checked against each other and
against the code they deploy (stream.config.ProcessorSettings, stream.metrics.ProcessorMetrics).
With `promtool` on PATH the Prometheus config, the alert rules' unit tests and the dashboard
queries are checked too; CI (env CI set) installs it and fails rather than skip without it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import generate_latest

from stream.config import ProcessorSettings, TopicSettings
from stream.metrics import ProcessorMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DATASOURCE = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "streamrec.yml"
DASHBOARD = GRAFANA_DIR / "dashboards" / "streamrec.json"

SERVICES = {"kafka", "topics-init", "streamrec", "prometheus", "grafana"}


# -- loading and small parsers -----------------------------------------------------------------
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = _yaml(COMPOSE)
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _container_ports(service: dict[str, Any]) -> dict[int, str]:
    """Published container port -> host address ("ip:port" or "port")."""
    out: dict[int, str] = {}
    for entry in service.get("ports") or []:
        parts = str(entry).split("/")[0].split(":")
        out[int(parts[-1])] = ":".join(parts[:-1])
    return out


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    out = []
    for entry in service.get("volumes") or []:
        parts = str(entry).split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(str(part) for part in test)


def _first_group(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return match.group(1)


def _listeners(kafka_env: dict[str, str], key: str) -> dict[str, tuple[str, int]]:
    """KAFKA_LISTENERS-style value -> {name: (host, port)}."""
    out = {}
    for item in kafka_env[key].split(","):
        name, _, rest = item.partition("://")
        out[name] = _split_addr(rest)
    return out


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    buffer = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        word, _, args = buffer.partition(" ")
        instructions.append((word.upper(), " ".join(args.split())))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a continuation line"
    return instructions


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in _dockerfile():
        if word == "ENV":
            for item in args.split(" "):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _dockerfile_healthcheck() -> list[str]:
    checks = [args for word, args in _dockerfile() if word == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    _, _, command = checks[0].partition(" CMD ")
    return json.loads(command)


# -- metric names ----------------------------------------------------------------------------
def exported_names() -> set[str]:
    """Every series name a ProcessorMetrics exposes (as Prometheus will see them)."""
    names: set[str] = set()
    for family in ProcessorMetrics("streamrec").registry.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(family.name)
    return names


_NOT_METRICS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (Grafana $variables allowed inside ranges)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # exponent of a number literal (1e3)
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group(0).lower() in _NOT_METRICS:
            continue
        names.add(match.group(0))
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            out.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])
    return out


def alert_rules() -> dict[str, dict[str, Any]]:
    rules = [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


def test_metric_name_helpers_read_real_exposition_names() -> None:
    names = exported_names()
    assert {
        "streamrec_events_consumed_total",
        "streamrec_dead_letters_total",
        "streamrec_end_to_end_latency_seconds_bucket",
        "streamrec_end_to_end_latency_seconds_count",
        "kafka_consumergroup_lag",
        "streamrec_ready",
    } <= names
    assert "streamrec_events_consumed" not in names  # counters only as <name>_total
    expr = (
        'sum by (le, stage) (rate(streamrec_stage_seconds_bucket{stage="score"}[$__rate_interval]))'
        " > 1e3 and on (job) up == 0 unless sum(foo:bar) without (instance)"
    )
    assert metric_names(expr) == {"streamrec_stage_seconds_bucket", "up", "foo:bar"}


# -- compose --------------------------------------------------------------------------------
def test_compose_has_the_five_services_and_declares_its_named_volumes(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) == SERVICES
    declared = set(_yaml(COMPOSE).get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, _, _ in _mounts(service):
            if source.startswith((".", "/")):
                if source != "./models":  # operator-provided (deploy/README.md)
                    assert (ROOT / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                used.add(source)
    assert used, "no named volumes"
    assert used <= declared, f"undeclared named volumes: {used - declared}"
    for name in ("kafka", "streamrec", "prometheus", "grafana"):
        assert any(not src.startswith((".", "/")) for src, _, _ in _mounts(services[name])), name


def test_kafka_is_a_single_node_kraft_broker(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    listeners = _listeners(env, "KAFKA_LISTENERS")
    assert set(listeners) == {"PLAINTEXT", "PLAINTEXT_HOST", "CONTROLLER"}
    assert listeners["PLAINTEXT"][1] == 9092
    assert listeners["PLAINTEXT_HOST"][1] == 29092
    # The one voter is this node, reached on the controller listener.
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@kafka:{listeners['CONTROLLER'][1]}"
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert set(protocols) == set(listeners)
    advertised = _listeners(env, "KAFKA_ADVERTISED_LISTENERS")
    assert advertised["PLAINTEXT"] == ("kafka", listeners["PLAINTEXT"][1])
    assert advertised["PLAINTEXT_HOST"] == ("localhost", 29092)
    assert "CONTROLLER" not in advertised
    assert _container_ports(kafka)[29092].endswith("29092")  # the host listener is published
    check = _healthcheck_command(kafka)
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in check
    assert f"--bootstrap-server localhost:{listeners['PLAINTEXT'][1]}" in check
    data = [(src, dst) for src, dst, _ in _mounts(kafka) if dst == env["KAFKA_LOG_DIRS"]]
    assert data and not data[0][0].startswith((".", "/")), "the log dir must be a named volume"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"  # one broker


def test_topics_init_creates_the_settings_topics_once_kafka_is_healthy(
    services: dict[str, dict[str, Any]],
) -> None:
    init = services["topics-init"]
    assert init["image"] == services["kafka"]["image"]
    assert _depends_on(init) == {"kafka": "service_healthy"}
    assert init["restart"] == "no"
    command = init["command"]
    script = " ".join(command) if isinstance(command, list) else command
    lines = [" ".join(line.split()) for line in script.replace("\\\n", " ").splitlines()]
    creates = {}
    for line in lines:
        if "kafka-topics.sh" in line and "--create" in line:
            creates[_first_group(r"--topic (\S+)", line)] = line
    topics = TopicSettings()
    assert set(creates) == {topics.clicks, topics.recs, topics.dlq}
    for name, line in creates.items():
        assert line.startswith("/opt/kafka/bin/kafka-topics.sh "), line
        assert "--bootstrap-server kafka:9092" in line
        assert "--if-not-exists" in line
        assert f"--partitions {topics.partitions}" in line
        compacted = "--config cleanup.policy=compact" in line
        assert compacted == (name == topics.recs), line


def test_streamrec_builds_the_dockerfile_and_reaches_kafka_on_its_plaintext_listener(
    services: dict[str, dict[str, Any]],
) -> None:
    app = services["streamrec"]
    build = app["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (context / dockerfile).resolve() == DOCKERFILE
    env = _env(app)
    host, port = _split_addr(env["STREAMREC_KAFKA__BOOTSTRAP_SERVERS"])
    assert host == "kafka" and host in services
    assert port == _listeners(_env(services["kafka"]), "KAFKA_LISTENERS")["PLAINTEXT"][1]
    assert _depends_on(app) == {
        "kafka": "service_healthy",
        "topics-init": "service_completed_successfully",
    }
    assert app["command"] == ["run"]
    assert app["restart"] == "unless-stopped"


def test_streamrec_ports_volumes_and_healthcheck_agree_with_its_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    app = services["streamrec"]
    env = _env(app)
    host, port = _split_addr(env["STREAMREC_METRICS_ADDR"])
    assert host == "0.0.0.0"  # reachable from prometheus on the compose network
    assert port in _container_ports(app)
    mounts = {dst: (src, mode) for src, dst, mode in _mounts(app)}
    assert mounts[env["STREAMREC_BUNDLE"]] == ("./models", "ro")
    state_source, state_mode = mounts[env["STREAMREC_STATE_DIR"]]
    assert not state_source.startswith((".", "/")) and state_mode == "rw"
    check = _healthcheck_command(app)
    assert f"http://127.0.0.1:{port}/livez" in check
    assert app["healthcheck"]["test"][1:] == _dockerfile_healthcheck()  # the same probe


@pytest.mark.parametrize("source", ["compose", "dockerfile"])
def test_streamrec_env_vars_are_real_processor_settings(
    source: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(services["streamrec"]) if source == "compose" else _dockerfile_env()
    env = {key: value for key, value in env.items() if key.startswith("STREAMREC_")}
    assert len(env) >= 3
    for key in list(os.environ):
        if key.startswith("STREAMREC_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = ProcessorSettings()
    for key, value in env.items():
        node: Any = settings
        for part in key.removeprefix("STREAMREC_").lower().split("__"):
            # Unknown names are silently ignored by the settings (extra="ignore"): catch typos.
            assert part in type(node).model_fields, f"{key}: no setting {part!r}"
            node = getattr(node, part)
        assert str(node) == value, key


def test_grafana_and_prometheus_publish_their_ports(services: dict[str, dict[str, Any]]) -> None:
    assert 9090 in _container_ports(services["prometheus"])
    assert 3000 in _container_ports(services["grafana"])
    assert services["prometheus"]["image"] == "prom/prometheus:v2.53.0"
    assert services["grafana"]["image"] == "grafana/grafana:11.1.0"
    env = _env(services["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for name in ("kafka", "streamrec", "prometheus"):
        assert services[name]["healthcheck"]["test"], name


# -- Dockerfile -----------------------------------------------------------------------------
def test_dockerfile_installs_only_the_serving_core() -> None:
    instructions = _dockerfile()
    froms = [args for word, args in instructions if word == "FROM"]
    assert froms and all(args.split()[0] == "python:3.11-slim" for args in froms)
    installs = [args for word, args in instructions if word == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        assert "torch" not in args and "[" not in args, f"extras or torch installed: {args}"
    assert any(re.search(r"pip install (?:-\S+ )*\.(?:\s|$)", args) for args in installs)
    base = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [dep for dep in base["dependencies"] if dep.lower().startswith("torch")]


def test_dockerfile_runs_as_non_root_with_a_livez_healthcheck() -> None:
    instructions = _dockerfile()
    words = [word for word, _ in instructions]
    last_from = len(words) - 1 - words[::-1].index("FROM")
    users = [args for word, args in instructions[last_from:] if word == "USER"]
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    probe = " ".join(_dockerfile_healthcheck())
    assert "urllib" in probe and "http://127.0.0.1:9108/livez" in probe
    assert ("EXPOSE", "9108") in instructions
    entrypoint = [json.loads(args) for word, args in instructions if word == "ENTRYPOINT"]
    assert entrypoint == [["streamrec"]]
    assert [json.loads(args) for word, args in instructions if word == "CMD"] == [["run"]]
    # The state directory exists in the image and belongs to the runtime user, so a named
    # volume mounted there inherits a writable owner.
    state_dir = _dockerfile_env()["STREAMREC_STATE_DIR"]
    assert any(
        word == "RUN" and "chown" in args and state_dir in args for word, args in instructions
    )


def test_dockerignore_excludes_local_state_but_not_the_build_inputs() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".venv", ".demo", ".git", "*.onnx", ".pytest_cache"):
        assert needed in patterns, needed
    copied = [
        source
        for word, args in _dockerfile()
        if word == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "stream", "export", "model"} <= set(copied)
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in patterns), path


# -- Prometheus -----------------------------------------------------------------------------
def test_prometheus_scrapes_the_streamrec_service_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for cfg in jobs["streamrec"]["static_configs"] for t in cfg["targets"]]
    assert len(targets) == 1
    host, port = _split_addr(targets[0])
    assert host == "streamrec" and host in services
    assert port == _split_addr(_env(services["streamrec"])["STREAMREC_METRICS_ADDR"])[1]
    assert jobs["streamrec"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]


def test_prometheus_container_sees_the_config_and_rules_where_the_config_says(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    mounts = {dst: src for src, dst, _ in _mounts(prometheus)}
    flags = dict(arg.split("=", 1) for arg in prometheus["command"] if "=" in arg)
    config_path = PurePosixPath(flags["--config.file"])
    assert (ROOT / mounts[str(config_path)]).resolve() == PROMETHEUS_CONFIG
    for rule_file in _yaml(PROMETHEUS_CONFIG)["rule_files"]:
        on_host = (PROMETHEUS_CONFIG.parent / rule_file).resolve()
        assert on_host.is_file(), rule_file
        assert (ROOT / mounts[str(config_path.parent / rule_file)]).resolve() == on_host


def test_alert_rules_use_real_metrics_with_severity_and_guidance() -> None:
    rules = alert_rules()
    expected_for = {
        "StreamrecLagGrowing": "5m",
        "StreamrecDown": "1m",
        "StreamrecNotReady": "2m",
        "StreamrecDeadLettersHigh": "10m",
        "StreamrecHighLatency": "10m",
        "StreamrecModelReloadRefused": None,
    }
    assert set(rules) == set(expected_for)
    known = exported_names() | {"up"}  # up: Prometheus' own per-target series
    for name, rule in rules.items():
        used = metric_names(rule["expr"])
        assert used, name
        assert used <= known, f"{name} uses unknown metrics {used - known}"
        assert rule.get("for") == expected_for[name], name
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 80, name
    assert "kafka_consumergroup_lag" in metric_names(rules["StreamrecLagGrowing"]["expr"])
    assert "> 1000" in rules["StreamrecLagGrowing"]["expr"]
    assert "0.01 *" in rules["StreamrecDeadLettersHigh"]["expr"]
    assert "histogram_quantile(0.99" in rules["StreamrecHighLatency"]["expr"]
    assert '{job="streamrec",result="refused"}' in rules["StreamrecModelReloadRefused"]["expr"]


def test_alert_unit_tests_cover_firing_and_quiet_cases() -> None:
    spec = _yaml(ALERTS_TEST)
    assert spec["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    required = {"StreamrecLagGrowing", "StreamrecDown", "StreamrecDeadLettersHigh"}
    assert required <= firing and required <= quiet
    assert set(alert_rules()) <= firing


# -- Grafana --------------------------------------------------------------------------------
def test_grafana_datasource_and_dashboard_provider_point_at_the_stack(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounts = {(ROOT / src).resolve(): dst for src, dst, _ in _mounts(grafana) if src[0] in "./"}
    assert mounts[GRAFANA_DIR / "provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _yaml(DATASOURCE)["datasources"]
    assert datasource["type"] == "prometheus"
    url = urlsplit(datasource["url"])
    assert url.hostname == "prometheus" and url.hostname in services
    assert url.port in _container_ports(services["prometheus"])
    (provider,) = _yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts[DASHBOARD.parent]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert uids == {datasource["uid"]}


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "streamrec"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]


def test_dashboard_queries_use_only_real_metrics_and_cover_the_required_panels() -> None:
    exprs = dashboard_exprs()
    known = exported_names()
    used: set[str] = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert names <= known, f"{title}: unknown metrics {names - known}"
        used |= names
    assert {
        "streamrec_events_consumed_total",
        "streamrec_recommendations_produced_total",
        "kafka_consumergroup_lag",
        "streamrec_end_to_end_latency_seconds_bucket",
        "streamrec_stage_seconds_bucket",
        "streamrec_dead_letters_total",
        "streamrec_model_info",
        "streamrec_assigned_partitions",
        "streamrec_sessions",
        "streamrec_rebalances_total",
        "streamrec_model_reloads_total",
    } <= used
    latency = [e for _, e in exprs if "streamrec_end_to_end_latency_seconds_bucket" in e]
    quantiles = {_first_group(r"histogram_quantile\(([0-9.]+)", e) for e in latency}
    assert quantiles == {"0.5", "0.95", "0.99"}
    assert any("by (le, stage)" in e for _, e in exprs)
    assert any("by (reason)" in e and "streamrec_dead_letters_total" in e for _, e in exprs)
    assert any("partition" in e and "kafka_consumergroup_lag" in e for _, e in exprs)


# -- promtool -------------------------------------------------------------------------------
@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not on PATH although CI is set: install Debian's prometheus")
        pytest.skip("promtool not on PATH (apt-get install prometheus); CI fails without it")
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_the_prometheus_config_and_its_rule_file(promtool: str) -> None:
    result = _run(promtool, "check", "config", "deploy/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout  # alerts.yml resolved next to the config


def test_promtool_alert_rule_unit_tests_pass(promtool: str) -> None:
    result = _run(promtool, "test", "rules", "deploy/prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_parses_every_dashboard_query(promtool: str, tmp_path: Path) -> None:
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$__range", "1h"),
        }
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


def test_promtool_lints_the_processor_exposition(promtool: str) -> None:
    metrics = ProcessorMetrics("streamrec")
    metrics.consumed.inc(3)
    metrics.dead_letters.labels("not_json").inc()
    metrics.end_to_end.observe(0.02)
    metrics.set_lag("clicks", 0, 7)
    metrics.set_model("sasrec-test")
    metrics.rebalances.labels("assign").inc()
    metrics.errors.labels("delivery").inc()
    exposition = generate_latest(metrics.registry).decode()
    assert "streamrec_dead_letters_total" in exposition
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
