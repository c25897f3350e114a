"""What the Grafana ClickHouse datasource plugin (grafana-clickhouse-datasource v4) does to a
panel's SQL before ClickHouse sees it, and what a panel's format needs back. Pure: no I/O.

The dashboards in `dashboards/*.json` are built with this (`dashboards/build.py`: panels,
targets and template variables in the shapes the plugin and Grafana read) and tested with it:
every panel's `rawSql` is expanded here, run against a recorded run, and its result checked
with `check_result`.

Macro expansion follows the plugin's own definitions:
- the macro table in the plugin's docs ("Macros", https://clickhouse.com/docs/integrations/grafana/query-builder
  and https://grafana.com/docs/plugins/grafana-clickhouse-datasource/latest/): `$__timeFilter(col)`
  -> `col >= toDateTime(<from>) AND col <= toDateTime(<to>)`, `$__fromTime` / `$__toTime` ->
  `toDateTime(<epoch s>)`, `$__interval_s` -> the interval in seconds, `$__timeInterval(col)` ->
  `toStartOfInterval(toDateTime(col), INTERVAL <n> second)`;
- its backend source, grafana/clickhouse-datasource pkg/macros/macros.go (seconds are
  `time.Unix()`, the interval is `max(interval, 1)` whole seconds);
- template variables are replaced first, in the browser, by Grafana's templateSrv with the
  plugin's `format` (src/data/CHDatasource.ts): a single value is inserted as it is (so the
  SQL writes the quotes: `sender = '${agent}'`), a multi-value list as `'a','b'`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_UID = "beamline-clickhouse"
DATASOURCE = {"type": PLUGIN, "uid": DATASOURCE_UID}

# the target's `format` is sqlutil.FormatQueryOption (grafana-plugin-sdk-go): 0 time series,
# 1 table, 3 trace (the plugin maps its "traces" query type to 3: src/data/utils.ts)
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1
FORMAT_TRACE = 3

# What Grafana's trace view reads, named as the plugin's trace-ID query names it
# (src/data/sqlGenerator.ts generateTraceIdQuery; the query in ClickHouse's observability
# guide, "Using the Grafana plugin"): each field and what its ClickHouse type must be.
TRACE_FIELDS: dict[str, str] = {
    "traceID": "text",
    "spanID": "text",
    "parentSpanID": "text",
    "serviceName": "text",
    "operationName": "text",
    "startTime": "time",  # a DateTime64, or epoch milliseconds
    "duration": "number",  # milliseconds
    "tags": "key-values",  # Array(Map(String, String)): [{'key': k, 'value': v}, ...]
    "serviceTags": "key-values",
}

_FUNCTION_MACRO = re.compile(r"\$__(timeFilter|timeInterval)\(\s*([^()]*?)\s*\)")
_PLAIN_MACRO = re.compile(r"\$__(fromTime|toTime|interval_s)(?![\w(])")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_NUMERIC = re.compile(r"^(Nullable\()?(U?Int\d+|Float\d+|Decimal.*)\)?$")
_TIME = re.compile(r"^(Nullable\()?(DateTime|DateTime64|Date|Date32)\b")


class MacroError(ValueError):
    """The SQL uses a macro or variable this expansion does not know."""


@dataclass(frozen=True)
class Window:
    """The dashboard's time range and the panel interval, in whole seconds."""

    from_s: int
    to_s: int
    interval_s: int = 60


def _datetime(epoch_s: int) -> str:
    return f"toDateTime({epoch_s})"


def format_value(value: str | Sequence[str]) -> str:
    """How the plugin formats a template variable's value (CHDatasource.format)."""
    if isinstance(value, str):
        return value
    return "'" + "','".join(value) + "'"


def expand(sql: str, window: Window, variables: Mapping[str, str | Sequence[str]]) -> str:
    """The SQL that ClickHouse receives for a panel: variables, then the plugin's macros."""

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name.startswith("__"):
            return m.group(0)  # a macro, expanded below
        if name not in variables:
            raise MacroError(f"template variable {name!r} has no value")
        return format_value(variables[name])

    sql = _VARIABLE.sub(variable, sql)
    interval = max(window.interval_s, 1)

    def function(m: re.Match[str]) -> str:
        name, column = m.group(1), m.group(2)
        if not column or "," in column:
            raise MacroError(f"$__{name} takes exactly one argument, got {column!r}")
        if name == "timeFilter":
            return (
                f"{column} >= {_datetime(window.from_s)} AND {column} <= {_datetime(window.to_s)}"
            )
        return f"toStartOfInterval(toDateTime({column}), INTERVAL {interval} second)"

    sql = _FUNCTION_MACRO.sub(function, sql)
    plain = {
        "fromTime": _datetime(window.from_s),
        "toTime": _datetime(window.to_s),
        "interval_s": str(interval),
    }
    sql = _PLAIN_MACRO.sub(lambda m: plain[m.group(1)], sql)
    if "$" in sql:
        raise MacroError(f"unexpanded macro or variable left in: {sql[sql.index('$') :][:40]!r}")
    return sql


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every target of every panel that has one."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def declared_columns(panel: Mapping[str, Any]) -> list[str] | None:
    """The columns a table panel declares, in order: its `organize` transformation."""
    for transformation in panel.get("transformations", []):
        if transformation.get("id") == "organize":
            index: dict[str, int] = transformation.get("options", {}).get("indexByName", {})
            return sorted(index, key=lambda name: index[name])
    return None


def is_numeric(clickhouse_type: str) -> bool:
    return bool(_NUMERIC.match(clickhouse_type))


def is_time(clickhouse_type: str) -> bool:
    return bool(_TIME.match(clickhouse_type))


def check_result(
    panel: Mapping[str, Any],
    target: Mapping[str, Any],
    columns: Sequence[str],
    types: Sequence[str],
    rows: Sequence[Sequence[Any]],
) -> list[str]:
    """What is wrong with a panel's result for its format; empty when it is fine."""
    problems: list[str] = []
    if not rows:
        problems.append("no rows")
    fmt = target.get("format")
    pairs = list(zip(columns, types, strict=False))
    if fmt == FORMAT_TIME_SERIES:
        if target.get("queryType") != "timeseries":
            problems.append(f"format time series but queryType {target.get('queryType')!r}")
        if not columns or not is_time(types[0]):
            problems.append(f"the first column must be a time, got {pairs}")
        values = [(c, t) for c, t in zip(columns[1:], types[1:], strict=True) if is_numeric(t)]
        others = [(c, t) for c, t in zip(columns[1:], types[1:], strict=True) if not is_numeric(t)]
        if not values:
            problems.append(f"no numeric value column in {pairs}")
        # a string column is a series label (long format, which Grafana pivots); nothing else
        problems.extend(
            f"column {c!r} of type {t} is neither a value nor a label"
            for c, t in others
            if "String" not in t
        )
    elif fmt == FORMAT_TABLE:
        if target.get("queryType") != "table":
            problems.append(f"format table but queryType {target.get('queryType')!r}")
        declared = declared_columns(panel)
        if declared is None:
            problems.append("a table panel must declare its columns (organize transformation)")
        elif list(columns) != declared:
            problems.append(f"columns {list(columns)} are not the declared {declared}")
    elif fmt == FORMAT_TRACE:
        if target.get("queryType") != "traces":
            problems.append(f"format trace but queryType {target.get('queryType')!r}")
        problems.extend(_trace_problems(dict(pairs)))
    else:
        problems.append(f"unknown format {fmt!r}")
    return problems


def _trace_problems(types: Mapping[str, str]) -> list[str]:
    fits: dict[str, Callable[[str], bool]] = {
        "text": lambda t: "String" in t,
        "time": lambda t: is_time(t) or is_numeric(t),
        "number": is_numeric,
        "key-values": lambda t: t.startswith("Array(Map("),
    }
    problems: list[str] = []
    for field, kind in TRACE_FIELDS.items():
        if field not in types:
            problems.append(f"the trace view needs a column {field!r}")
        elif not fits[kind](types[field]):
            problems.append(f"column {field!r} must be {kind}, got {types[field]}")
    return problems


# --- building dashboards ----------------------------------------------------------------

_QUERY_TYPES = {FORMAT_TIME_SERIES: "timeseries", FORMAT_TABLE: "table", FORMAT_TRACE: "traces"}


def target(sql: str, fmt: int) -> dict[str, Any]:
    """A SQL-editor query; its queryType is the plugin's name for the format."""
    return {
        "datasource": DATASOURCE,
        "editorType": "sql",
        "format": fmt,
        "queryType": _QUERY_TYPES[fmt],
        "rawSql": " ".join(sql.split()),
        "refId": "A",
    }


def timeseries(
    title: str, sql: str, unit: str = "short", desc: str = "", steps: bool = False
) -> dict[str, Any]:
    """`steps`: a level that holds until the next point (a count in flight), not a rate."""
    defaults: dict[str, Any] = {"unit": unit}
    if steps:
        defaults["custom"] = {"lineInterpolation": "stepAfter"}
    return {
        "type": "timeseries",
        "title": title,
        "description": desc,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [target(sql, FORMAT_TIME_SERIES)],
    }


def table(
    title: str, sql: str, columns: list[str], kind: str = "table", desc: str = ""
) -> dict[str, Any]:
    """A table (or stat) panel. A column named `trace_id` gets the plugin's "View trace" link,
    which opens the trace view with the datasource's trace defaults (the provisioning)."""
    return {
        "type": kind,
        "title": title,
        "description": desc,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
        "targets": [target(sql, FORMAT_TABLE)],
        # declares the panel's columns (and their order): check_result holds the SQL to it
        "transformations": [
            {"id": "organize", "options": {"indexByName": {c: i for i, c in enumerate(columns)}}}
        ],
    }


def traces(title: str, sql: str, desc: str = "") -> dict[str, Any]:
    """Grafana's trace view of one trace: the SQL returns TRACE_FIELDS."""
    return {
        "type": "traces",
        "title": title,
        "description": desc,
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {},
        "targets": [target(sql, FORMAT_TRACE)],
    }


def query_variable(name: str, sql: str, any_value: str | None = None) -> dict[str, Any]:
    """A variable whose values a query gives. `any_value`: an "All" choice that inserts this
    value, for SQL that reads it as "no filter" (`'${v}' = '*' OR col = '${v}'`)."""
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DATASOURCE,
        "query": " ".join(sql.split()),
        "definition": " ".join(sql.split()),
        "refresh": 2,  # on time range change
        "sort": 1,
        "multi": False,
        "includeAll": any_value is not None,
        **({"allValue": any_value} if any_value is not None else {}),
        "current": {},
        "options": [],
    }


def text_variable(name: str, default: str, desc: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "textbox",
        "description": desc,
        "query": default,
        "current": {"text": default, "value": default},
        "options": [],
    }


def custom_variable(name: str, choices: dict[str, str], desc: str) -> dict[str, Any]:
    """A fixed list: label -> value (Grafana's `label : value` syntax); the first is current."""
    first = next(iter(choices.items()))
    return {
        "name": name,
        "label": name,
        "type": "custom",
        "description": desc,
        "query": ", ".join(f"{label} : {value}" for label, value in choices.items()),
        "current": {"text": first[0], "value": first[1]},
        "options": [{"text": label, "value": value} for label, value in choices.items()],
        "multi": False,
        "includeAll": False,
    }


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    """Panels laid out in order: tables and trace views full width, the others two a row."""
    laid_out: list[dict[str, Any]] = []
    x = y = row_height = 0
    for i, panel in enumerate(panels, 1):
        width = 24 if panel["type"] in ("table", "traces") else 12
        height = 16 if panel["type"] == "traces" else 8
        if x + width > 24:
            x, y, row_height = 0, y + row_height, 0
        grid = {"h": height, "w": width, "x": x, "y": y}
        laid_out.append({"id": i, "datasource": DATASOURCE, "gridPos": grid, **panel})
        x, row_height = x + width, max(row_height, height)
    return {
        "uid": uid,
        "title": title,
        "tags": ["beamline"],
        "timezone": "utc",
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["beamline"], "asDropdown": True, "title": "Beamline"}
        ],
        "panels": laid_out,
    }
