"""What the Grafana ClickHouse datasource plugin (grafana-clickhouse-datasource v4) does to a
panel's SQL before ClickHouse sees it, and what a panel's format needs back. Pure: no I/O.

The dashboards in `dashboards/*.json` are tested with this: every panel's `rawSql` is
expanded here, run against a recorded run, and its result checked with `check_result`.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_UID = "beamline-clickhouse"
DATASOURCE = {"type": PLUGIN, "uid": DATASOURCE_UID}

# the target's `format` is sqlutil.FormatQueryOption (grafana-plugin-sdk-go): 0 time series, 1 table
FORMAT_TIME_SERIES = 0
FORMAT_TABLE = 1

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
    else:
        problems.append(f"unknown format {fmt!r}")
    return problems
