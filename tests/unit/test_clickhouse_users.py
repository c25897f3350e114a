"""ClickHouse users for the containers (infra/clickhouse/users.xml): a writer for the
recorder, a read-only user for Grafana and direct readers.

No ClickHouse server runs here, so: the XML is parsed and its limits and constraints
checked; its GRANT statements go through the real ClickHouse parser (chDB's `EXPLAIN AST`
rejects an unknown privilege); and the read-only profile's settings are applied to a real
engine (chDB) holding the real schema, which must then refuse INSERT, ALTER, DROP and any
attempt to lift a limit. chDB runs in a child process: one engine per process, and the
storage tests hold theirs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
USERS_XML = ROOT / "infra/clickhouse/users.xml"
GRAFANA_DATASOURCE = ROOT / "infra/grafana/provisioning/datasources/clickhouse.yaml"
# what a dashboard query may use at most, and the constraint that pins each
LIMITS = (
    "max_execution_time",
    "max_memory_usage",
    "max_rows_to_read",
    "max_result_rows",
    "max_result_bytes",
    "max_threads",
    "max_concurrent_queries_for_user",
)
PINNED = (*LIMITS, "result_overflow_mode", "read_overflow_mode", "allow_ddl")
WRITES = (
    "INSERT INTO bl_messages (id) VALUES ('x')",
    "ALTER TABLE bl_messages DELETE WHERE 1",
    "ALTER TABLE bl_messages MODIFY TTL toDateTime(ts) + INTERVAL 1 DAY",
    "DROP TABLE bl_messages",
    "TRUNCATE TABLE bl_messages",
    "CREATE TABLE stolen (a UInt8) ENGINE = Memory",
    "SET max_result_rows = 0",
    "SELECT 1 SETTINGS max_memory_usage = 0",
    "SELECT 1 SETTINGS readonly = 0",
)


def tree() -> ET.Element:
    return ET.parse(USERS_XML).getroot()


def profile(name: str) -> ET.Element:
    found = tree().find(f"profiles/{name}")
    assert found is not None, name
    return found


def settings_of(name: str) -> dict[str, str]:
    """A profile's settings in file order, `readonly` last (once set, nothing changes)."""
    items = {e.tag: (e.text or "").strip() for e in profile(name) if e.tag != "constraints"}
    return {k: v for k, v in items.items() if k != "readonly"} | (
        {"readonly": items["readonly"]} if "readonly" in items else {}
    )


def constraint(profile_name: str, setting: str) -> ET.Element:
    found = profile(profile_name).find(f"constraints/{setting}")
    assert found is not None, f"{profile_name}: no constraint on {setting}"
    return found


def user(name: str) -> ET.Element:
    found = tree().find(f"users/{name}")
    assert found is not None, name
    return found


def setting_names() -> set[str]:
    """Every setting the profiles set or constrain."""
    names = set()
    for element in tree().findall("profiles/*"):
        names |= {e.tag for e in element if e.tag != "constraints"}
        names |= {c.tag for c in element.findall("constraints/*")}
    return names


def grants(name: str) -> list[str]:
    return [(q.text or "").strip() for q in user(name).findall("grants/query")]


# --- the file --------------------------------------------------------------------------------


def test_the_readonly_user_is_read_only_and_its_limits_cannot_be_lifted() -> None:
    ro = settings_of("beamline_readonly")
    assert ro["readonly"] == "1" and ro["allow_ddl"] == "0"
    for setting in PINNED:
        assert setting in ro, f"{setting} is not set in the read-only profile"
        rule = constraint("beamline_readonly", setting)
        fixed = rule.find("readonly") is not None or rule.find("const") is not None
        ceiling = rule.findtext("max")
        assert fixed or (ceiling is not None and float(ro[setting]) >= float(ceiling)), setting
    assert ro["result_overflow_mode"] == "throw" and ro["read_overflow_mode"] == "throw"


def test_only_the_timeout_grafana_sets_is_changeable_and_only_downwards() -> None:
    timeout = constraint("beamline_readonly", "max_execution_time")
    assert timeout.find("changeable_in_readonly") is not None
    changeable = [
        c.tag
        for c in profile("beamline_readonly").findall("constraints/*")
        if c.find("changeable_in_readonly") is not None
    ]
    assert changeable == ["max_execution_time"]
    grafana = yaml.safe_load(GRAFANA_DATASOURCE.read_text())["datasources"][0]["jsonData"]
    assert 1 <= float(grafana["queryTimeout"]) <= float(timeout.findtext("max") or 0)


def test_passwords_come_from_the_environment_only() -> None:
    for name in ("writer", "readonly"):
        password = user(name).find("password")
        assert password is not None and not (password.text or "").strip(), name
        assert password.get("from_env") == f"CLICKHOUSE_{name.upper()}_PASSWORD"
        assert user(name).find("password_sha256_hex") is None
        assert user(name).findtext("access_management") == "0"


def test_each_user_holds_only_what_it_needs() -> None:
    assert grants("readonly") == ["GRANT SELECT ON default.*"]
    (writer,) = grants("writer")
    for forbidden in ("DROP", "TRUNCATE", "DELETE", "UPDATE", "ALL", "*.*", "ACCESS"):
        assert forbidden not in writer.upper(), forbidden
    assert user("writer").findtext("profile") == "beamline_writer"
    assert user("readonly").findtext("profile") == "beamline_readonly"


# --- the real engine ----------------------------------------------------------------------------

_ENGINE_CHECK = """
import json, sys
from beamline import storage
from clickhouse_connect.driver.exceptions import DatabaseError

url, settings, names, grants, writes = sys.argv[1], *map(json.loads, sys.argv[2:])
admin = storage.connect(url)
storage.migrate(admin)
out = {"known": [r[0] for r in admin.query(
    "SELECT name FROM system.settings WHERE name IN {n:Array(String)}", parameters={"n": names}
).result_rows], "grants": {}, "refused": {}}
for grant in grants:
    try:
        admin.command("EXPLAIN AST " + grant + " TO somebody")
        out["grants"][grant] = ""
    except DatabaseError as exc:
        out["grants"][grant] = str(exc)
reader = storage.connect(url, settings)
for sql in writes:
    try:
        reader.command(sql)
        out["refused"][sql] = ""
    except DatabaseError as exc:
        out["refused"][sql] = str(exc)
out["count"] = reader.query("SELECT count() FROM bl_messages").result_rows[0][0]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url = f"chdb://{tmp_path_factory.mktemp('ch-users')}"
    settings = settings_of("beamline_readonly")
    probes = [*grants("writer"), *grants("readonly"), "GRANT SELECT, DROP EVERYTHING ON default.*"]
    args = (settings, sorted(setting_names()), probes, WRITES)
    done = subprocess.run(
        [sys.executable, "-c", _ENGINE_CHECK, url, *map(json.dumps, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_every_setting_and_constraint_names_a_setting_clickhouse_knows(
    engine: dict[str, Any],
) -> None:
    assert sorted(engine["known"]) == sorted(setting_names())


def test_the_grants_parse_as_clickhouse_grants(engine: dict[str, Any]) -> None:
    for grant in (*grants("writer"), *grants("readonly")):
        assert engine["grants"][grant] == "", engine["grants"][grant]
    assert engine["grants"]["GRANT SELECT, DROP EVERYTHING ON default.*"]  # the check can fail


@pytest.mark.parametrize("sql", WRITES)
def test_the_readonly_profile_refuses_writes_ddl_and_lifting_limits(
    engine: dict[str, Any], sql: str
) -> None:
    error = engine["refused"][sql]
    assert error, f"the read-only profile allowed: {sql}"
    assert "readonly" in error.lower() or "READONLY" in error, error


def test_the_readonly_profile_still_reads(engine: dict[str, Any]) -> None:
    assert engine["count"] == 0
