"""The plugin's macro expansion, the panel-result checker, and the committed dashboards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from beamline import grafana

ROOT = Path(__file__).resolve().parents[2]
WINDOW = grafana.Window(from_s=1415792726, to_s=1447328726, interval_s=20)


def test_macros_expand_as_the_plugin_documents_them() -> None:
    sql = (
        "SELECT $__timeInterval(ts) AS time, $__interval_s AS s FROM t "
        "WHERE $__timeFilter(ts) AND ts > $__fromTime AND ts < $__toTime AND a = '${agent}'"
    )
    assert grafana.expand(sql, WINDOW, {"agent": "researcher"}) == (
        "SELECT toStartOfInterval(toDateTime(ts), INTERVAL 20 second) AS time, 20 AS s FROM t "
        "WHERE ts >= toDateTime(1415792726) AND ts <= toDateTime(1447328726) "
        "AND ts > toDateTime(1415792726) AND ts < toDateTime(1447328726) AND a = 'researcher'"
    )
    # an interval under a second is one second; a multi-value variable is a quoted list
    assert grafana.expand("$__interval_s", grafana.Window(0, 1, 0), {}) == "1"
    assert grafana.expand("p IN (${p})", WINDOW, {"p": ["a", "b"]}) == "p IN ('a','b')"


@pytest.mark.parametrize("sql", ["$__timeFilter_ms(ts)", "${nobody}", "$__timeFilter(a, b)"])
def test_unknown_macros_and_variables_are_refused(sql: str) -> None:
    with pytest.raises(grafana.MacroError):
        grafana.expand(sql, WINDOW, {})


def series_target() -> dict[str, Any]:
    return {"format": grafana.FORMAT_TIME_SERIES, "queryType": "timeseries"}


def table_panel(columns: list[str]) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(columns)}
    return {"transformations": [{"id": "organize", "options": {"indexByName": index}}]}


def test_a_time_series_needs_a_time_first_and_numbers() -> None:
    ok = grafana.check_result({}, series_target(), ["time", "kind", "n"],
                              ["DateTime('UTC')", "LowCardinality(String)", "UInt64"], [[0, "a", 1]])  # fmt: skip
    assert ok == []
    bad = grafana.check_result({}, series_target(), ["n", "time"], ["UInt64", "DateTime"], [])
    assert any("first column" in p for p in bad) and "no rows" in bad


def test_a_table_must_return_exactly_its_declared_columns() -> None:
    target = {"format": grafana.FORMAT_TABLE, "queryType": "table"}
    panel = table_panel(["reason", "dead_letters"])
    assert grafana.check_result(panel, target, ["reason", "dead_letters"], ["String", "UInt64"], [["x", 1]]) == []  # fmt: skip
    problems = grafana.check_result(panel, target, ["reason"], ["String"], [["x"]])
    assert problems and "declared" in problems[0]
    assert grafana.check_result({}, target, ["a"], ["String"], [["x"]])  # nothing declared


TRACE_COLUMNS = {
    "traceID": "String",
    "spanID": "String",
    "parentSpanID": "String",
    "serviceName": "LowCardinality(String)",
    "operationName": "LowCardinality(String)",
    "startTime": "DateTime64(9)",
    "duration": "Float64",
    "tags": "Array(Map(String, String))",
    "serviceTags": "Array(Map(String, String))",
}


def test_a_trace_needs_the_fields_of_grafanas_trace_view() -> None:
    target = {"format": grafana.FORMAT_TRACE, "queryType": "traces"}
    columns, types = list(TRACE_COLUMNS), list(TRACE_COLUMNS.values())
    assert grafana.check_result({}, target, columns, types, [["row"]]) == []
    epoch_ms = [t if c != "startTime" else "Float64" for c, t in TRACE_COLUMNS.items()]
    assert grafana.check_result({}, target, columns, epoch_ms, [["row"]]) == []
    flat_tags = [t if c != "tags" else "Map(String, String)" for c, t in TRACE_COLUMNS.items()]
    problems = grafana.check_result({}, target, columns, flat_tags, [["row"]])
    assert problems == ["column 'tags' must be key-values, got Map(String, String)"]
    problems = grafana.check_result(
        {}, {**target, "queryType": "table"}, columns[1:], types[1:], []
    )
    assert "no rows" in problems and "the trace view needs a column 'traceID'" in problems
    assert any("queryType 'table'" in p for p in problems)


def test_panels_are_laid_out_in_rows_without_overlap() -> None:
    half = grafana.timeseries("t", "SELECT 1")
    board = grafana.dashboard(
        "u", "t", [half, half, grafana.table("x", "SELECT 1", ["a"]), half, grafana.traces("r", "SELECT 1")], []
    )  # fmt: skip
    grids = [p["gridPos"] for p in board["panels"]]
    assert [(g["x"], g["y"], g["w"]) for g in grids] == [(0, 0, 12), (12, 0, 12), (0, 8, 24), (0, 16, 12), (0, 24, 24)]  # fmt: skip
    assert [p["id"] for p in board["panels"]] == [1, 2, 3, 4, 5]
    assert board["panels"][4]["targets"][0]["queryType"] == "traces"


def load_build() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards_build", ROOT / "dashboards/build.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboards_are_the_generators_output() -> None:
    rendered = load_build().render()
    for name, text in rendered.items():
        assert (ROOT / "dashboards" / name).read_text() == text, (
            f"dashboards/{name} is stale: run `python dashboards/build.py`"
        )
    assert {p.name for p in (ROOT / "dashboards").glob("*.json")} == set(rendered)


def test_dashboards_have_stable_unique_uids_and_use_the_provisioned_datasource() -> None:
    provisioned = yaml.safe_load(
        (ROOT / "infra/grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )["datasources"][0]
    assert provisioned["uid"] == grafana.DATASOURCE_UID and provisioned["type"] == grafana.PLUGIN
    boards = [json.loads(p.read_text()) for p in sorted((ROOT / "dashboards").glob("*.json"))]
    assert sorted(b["uid"] for b in boards) == [
        "beamline-agent",
        "beamline-llm",
        "beamline-overview",
        "beamline-supervision",
        "beamline-traces",
    ]
    for board in boards:
        for panel, target in grafana.queries(board):
            assert target["datasource"] == grafana.DATASOURCE, panel["title"]
            assert target["editorType"] == "sql" and target["rawSql"], panel["title"]
    names = {v["name"] for b in boards for v in b["templating"]["list"]}
    assert names == {
        "agent",
        "provider",
        "supervisor",
        "conversation",
        "status",
        "min_duration_ms",
        "trace_id",
    }


def test_trace_links_open_the_trace_view_of_the_provisioned_otel_tables() -> None:
    # the plugin links a column named trace_id (or traceID) to its trace view, with the
    # datasource's trace defaults when the query is SQL (src/data/utils.ts)
    provisioned = yaml.safe_load(
        (ROOT / "infra/grafana/provisioning/datasources/clickhouse.yaml").read_text()
    )["datasources"][0]["jsonData"]["traces"]
    assert provisioned["defaultTable"] == "otel_traces" and provisioned["otelEnabled"] is True
    traces = json.loads((ROOT / "dashboards/traces.json").read_text())
    searches = [p for p in traces["panels"] if p["type"] == "table"]
    assert searches and all("trace_id" in (grafana.declared_columns(p) or []) for p in searches)
    (view,) = [p for p in traces["panels"] if p["type"] == "traces"]
    assert view["targets"][0]["format"] == grafana.FORMAT_TRACE
    assert "'${trace_id}'" in view["targets"][0]["rawSql"]
    assert "otel_traces_trace_id_ts" in view["targets"][0]["rawSql"]
