"""trace_lookup_p95_ms: one trace among 10,000,000 recorded messages, generated in the run
in the embedded engine (chDB), looked up with the SQL `beamline trace` runs first and that
finds a recent trace (`reads.TRACE_BY_TRACE_SQL`: one read of the trace-sorted copy,
bl_messages_by_trace), and with the Grafana plugin's query over otel_traces through the
exporter's trace-id lookup table. The generating INSERT goes through the schema's
materialized views, as the recorder's inserts do, so the lookup tables and the copy are
filled as in production.

`trace_range_lookup`: the path for conversations and for traces older than the copy's
retention (`reads.TRACE_SQL`: the id's time range from bl_messages_id_ts, then bl_messages
inside it).

Baselines from the same engine in the same run: a `SELECT 1` round trip; the same id filter
on bl_messages without the time range (what TRACE_SQL was before the lookup table: the three
bloom-filter skip indexes alone); and that filter with the skip indexes turned off (a scan).

Runs in a process of its own (`python -m bench.trace_lookup DIR`, JSON on stdout): chDB
opens one data path per process, and the engine's memory goes when the process does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client

from beamline import reads, storage

MESSAGES = int(os.environ.get("BENCH_TRACE_MESSAGES", "10000000"))
LOOKUPS = int(os.environ.get("BENCH_TRACE_LOOKUPS", "200"))
SCANS = 5  # the no-index baseline reads every granule: a few runs are enough
BLOOM_LOOKUPS = 50  # the skip-index-only baseline takes ~0.1 s a lookup
DAYS = 6  # spread of the timestamps, ending an hour ago (inside any retention TTL)
TARGET_P95_MS = 25.0

# Traces of 5..20 messages (12.5 on average), in windows of 200 consecutive messages that
# hold 16 traces interleaved, as concurrent conversations are: trace j of a window has
# 5 + j messages, and message `number` takes slot (number % 200) * 73 % 200 of its window.
_ENDS = [sum(5 + k for k in range(j + 1)) for j in range(16)]  # 5, 11, ..., 200
_STARTS = [0, *_ENDS[:-1]]
_TRACE = "lower(hex(MD5(concat('trace-', toString(trace_no)))))"
_TASK_SPAN = "substring(lower(hex(MD5(concat('task-', toString(trace_no))))), 1, 16)"

GENERATE_MESSAGES = f"""
INSERT INTO bl_messages (id, kind, subject, sender, recipient, conversation_id, step,
    trace_id, span_id, parent_span_id, ts, input_tokens, output_tokens, reason, payload,
    stream, stream_seq)
WITH
    (number % 200) * 73 % 200 AS slot,
    arrayFirstIndex(e -> e > slot, {_ENDS}) AS j1,
    intDiv(number, 200) * 16 + j1 - 1 AS trace_no,
    slot - {_STARTS}[j1] AS pos,
    4 + j1 AS last,
    multiIf(pos = 0, 'task', pos = last, 'reply',
            ['llm_response', 'event', 'tool_result', 'event'][pos % 4 + 1]) AS k,
    concat('agent-', toString(trace_no % 500)) AS agent
SELECT
    toString(generateUUIDv7(number)),
    k,
    concat('bl.journal.', agent, '.conv-', toString(trace_no)),
    if(k = 'llm_response', 'gateway.fakellm', agent),
    if(k = 'reply', 'user', agent),
    concat('conv-', toString(trace_no)),
    pos,
    {_TRACE},
    if(pos = 0, {_TASK_SPAN},
       substring(lower(hex(MD5(concat('span-', toString(number))))), 1, 16)),
    if(pos = 0, '', {_TASK_SPAN}),
    fromUnixTimestamp64Micro(toInt64({{t0_us:Int64}} + number * {{step_us:Int64}})),
    if(k = 'llm_response', 100 + number % 900, 0),
    if(k = 'llm_response', 5 + number % 300, 0),
    '',
    concat('{{"task_id": "t-', toString(trace_no), '", "text": "',
           repeat('lorem ipsum ', 1 + number % 12), toString(cityHash64(number)), '"}}'),
    'BL_JOURNAL',
    number + 1
FROM numbers({{n:UInt64}})
"""

# The spans those messages give, as the recorder would write them: a chat per LLM response,
# an execute_tool per tool result, an invoke_agent per reply (the task's span).
GENERATE_SPANS = """
INSERT INTO otel_traces (Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind,
    ServiceName, ResourceAttributes, ScopeName, SpanAttributes, Duration, StatusCode)
WITH multiIf(kind = 'llm_response', 40000000, kind = 'tool_result', 2000000,
             step * 300000000) AS duration_ns,
     if(kind = 'llm_response', 'beamline-gateway', 'beamline-agent') AS service
SELECT
    toDateTime64(ts, 9) - toIntervalNanosecond(duration_ns),
    trace_id,
    if(kind = 'reply', parent_span_id, span_id),
    if(kind = 'reply', '', parent_span_id),
    multiIf(kind = 'llm_response', 'chat m1', kind = 'tool_result', 'execute_tool calculator',
            concat('invoke_agent ', sender)),
    if(kind = 'llm_response', 'Client', 'Internal'),
    service,
    map('service.name', service),
    'beamline.recorder',
    map('gen_ai.conversation.id', conversation_id, 'beamline.envelope_id', id),
    duration_ns,
    'Unset'
FROM bl_messages
WHERE kind IN ('llm_response', 'tool_result', 'reply')
"""

# TRACE_SQL's filter on bl_messages alone, without the time range of the lookup table: with
# the skip indexes, the baseline the lookup table improves on; without them, a scan.
INDEX_ONLY_SQL = """
SELECT id, kind, sender, recipient, conversation_id, step, trace_id, span_id,
       parent_span_id, ts, input_tokens, output_tokens, reason, payload
FROM bl_messages FINAL
WHERE conversation_id = {id:String} OR trace_id = {id:String} OR id = {id:String}
ORDER BY ts, id
LIMIT 10000
"""

# The Grafana ClickHouse plugin's trace query (and the exporter's documented one): the
# trace's time range from the lookup table narrows otel_traces to its partitions.
OTEL_TRACE_SQL = """
WITH
    {id:String} AS trace_id,
    (SELECT min(Start) FROM otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_start,
    (SELECT max(End) + 1 FROM otel_traces_trace_id_ts WHERE TraceId = trace_id) AS trace_end
SELECT Timestamp, TraceId, SpanId, ParentSpanId, SpanName, SpanKind, ServiceName, Duration,
       StatusCode, StatusMessage, SpanAttributes, ResourceAttributes
FROM otel_traces
WHERE TraceId = trace_id AND Timestamp >= trace_start AND Timestamp <= trace_end
ORDER BY Timestamp
LIMIT 10000
"""


def generate(client: Client, messages: int) -> dict[str, Any]:
    """Fill bl_messages (and through its view bl_messages_id_ts) and otel_traces; the sizes
    and the time it took."""
    started = time.perf_counter()
    span_us = DAYS * 86_400 * 1_000_000
    t0_us = int((time.time() - 3600) * 1_000_000) - span_us
    client.command(
        GENERATE_MESSAGES,
        parameters={"n": messages, "t0_us": t0_us, "step_us": max(1, span_us // messages)},
    )
    client.command(GENERATE_SPANS)
    generated = time.perf_counter()
    settle(client)
    count = client.query(
        "SELECT (SELECT count() FROM bl_messages), (SELECT count() FROM otel_traces),"
        " (SELECT count() FROM system.parts WHERE active AND table = 'bl_messages'),"
        " (SELECT sum(data_compressed_bytes) FROM system.parts"
        "  WHERE active AND table = 'bl_messages'),"
        " (SELECT sum(data_compressed_bytes) FROM system.parts"
        "  WHERE active AND table = 'bl_messages_by_trace'),"
        f" (SELECT count() FROM {reads.MESSAGES_ID_TS_TABLE}),"
        " (SELECT count() FROM system.parts WHERE active AND table = {t:String})",
        parameters={"t": reads.MESSAGES_ID_TS_TABLE},
    ).result_rows[0]
    return {
        "trace_messages": int(count[0]),
        "trace_spans": int(count[1]),
        "trace_message_parts": int(count[2]),
        "trace_messages_mib": round(int(count[3]) / 2**20, 1),
        "trace_by_trace_copy_mib": round(int(count[4]) / 2**20, 1),
        "trace_id_ts_rows": int(count[5]),
        "trace_id_ts_parts": int(count[6]),
        "trace_generate_s": round(generated - started, 1),
        "trace_merges_wait_s": round(time.perf_counter() - generated, 1),
    }


def settle(client: Client, limit_s: float = 300.0) -> None:
    """Wait for the background merges the big insert started: lookups racing them for the
    two cores measure the merges. A recorder's table between merges is the state to time."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not client.query("SELECT count() FROM system.merges").result_rows[0][0]:
            return
        time.sleep(1)


def trace_id(trace_no: int) -> str:
    """The generated trace id of trace number `trace_no` (the SQL's `_TRACE`)."""
    return hashlib.md5(f"trace-{trace_no}".encode()).hexdigest()


def timed(client: Client, sql: str, parameters: dict[str, Any], **settings: Any) -> float:
    started = time.perf_counter()
    rows = client.query(sql, parameters=parameters, settings=settings or None).result_rows
    elapsed = (time.perf_counter() - started) * 1000
    if not rows:
        raise RuntimeError(f"a lookup found nothing: {parameters}")
    return elapsed


def percentiles(prefix: str, ms: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {f"{prefix}_p50_ms": round(cuts[49], 2), f"{prefix}_p95_ms": round(cuts[94], 2)}


def lookups(client: Client, messages: int) -> dict[str, Any]:
    """Each lookup is of another random trace, from the complete windows of 16 traces."""
    rng = random.Random(7)
    ids = [trace_id(rng.randrange(messages // 200 * 16)) for _ in range(LOOKUPS)]
    for warm in ids[:5]:  # first reads load marks and index files
        timed(client, reads.TRACE_BY_TRACE_SQL, {"id": warm})
        timed(client, reads.TRACE_SQL, {"id": warm})
        timed(client, OTEL_TRACE_SQL, {"id": warm})
    out: dict[str, Any] = {}
    fast = [timed(client, reads.TRACE_BY_TRACE_SQL, {"id": i}) for i in ids]
    out.update(percentiles("trace_lookup", fast))
    ranged = [timed(client, reads.TRACE_SQL, {"id": i}) for i in ids]
    out.update(percentiles("trace_range_lookup", ranged))
    out.update(
        percentiles("otel_trace_lookup", [timed(client, OTEL_TRACE_SQL, {"id": i}) for i in ids])
    )
    out.update(percentiles("select1", [timed(client, "SELECT 1", {}) for _ in range(LOOKUPS)]))
    bloom = [timed(client, INDEX_ONLY_SQL, {"id": i}) for i in ids[:BLOOM_LOOKUPS]]
    out.update(percentiles("trace_index_only", bloom))
    scans = [timed(client, INDEX_ONLY_SQL, {"id": i}, use_skip_indexes=0) for i in ids[:SCANS]]
    out["trace_scan_ms"] = round(statistics.median(scans), 1)
    return out


def run(path: Path, messages: int = MESSAGES) -> dict[str, Any]:
    client = storage.connect(f"chdb://{path}")
    try:
        storage.migrate(client)
        result = generate(client, messages)
        result.update(lookups(client, messages))
    finally:
        client.close()
    result["trace_lookup_vs_scan"] = round(
        result["trace_lookup_p95_ms"] / result["trace_scan_ms"], 4
    )
    result["trace_lookup_vs_index_only"] = round(
        result["trace_lookup_p95_ms"] / result["trace_index_only_p95_ms"], 3
    )
    result["trace_lookup_target"] = f"p95 < {TARGET_P95_MS:g} ms"
    return result


if __name__ == "__main__":
    print(json.dumps(run(Path(sys.argv[1]))))
