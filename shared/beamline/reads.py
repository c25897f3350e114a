"""The read queries people run: one place for their SQL, always with server-side
parameters. They run through the recorder (`beamline.query`, embedded mode) or directly
against a ClickHouse server (`beamline.readonly.run_readonly`)."""

from __future__ import annotations

from typing import Final

from beamline.rows import MESSAGES_TABLE

# The table that maps each conversation id, trace id and envelope id to the time range of
# its messages (infra/clickhouse/003_messages_id_ts.sql, filled by a materialized view).
MESSAGES_ID_TS_TABLE: Final = "bl_messages_id_ts"

# The recent messages again, sorted by trace (infra/clickhouse/004_messages_by_trace.sql).
MESSAGES_BY_TRACE_TABLE: Final = "bl_messages_by_trace"

# One trace, in time order, in one read of the trace-sorted copy: what `beamline trace ID`
# tries first (see TRACE_SQLS). Not FINAL: with the copy in several parts (as a live table
# always is) FINAL costs as much as the whole lookup; a duplicate row there can only be the
# same envelope recorded twice (the copy holds no raw rows), so one row per id is kept.
TRACE_BY_TRACE_SQL: Final = f"""
SELECT id, kind, sender, recipient, conversation_id, step, trace_id, span_id,
       parent_span_id, ts, input_tokens, output_tokens, reason, payload
FROM {MESSAGES_BY_TRACE_TABLE}
WHERE trace_id = {{id:String}}
ORDER BY ts, id
LIMIT 1 BY id
LIMIT 10000
"""

# A conversation, a trace or one envelope, in time order: what `beamline trace ID` shows.
# The id's time range comes first, from the lookup table; the primary index on ts then
# narrows bl_messages to the granules inside it, and FINAL collapses duplicates there only.
# The range is [first, last] over every message the id names, so none is outside it, and
# the id filter still applies inside it. An id with no message has no row there either (the
# range is then the epoch, twice); '' is never a key, so `beamline trace ''` finds nothing.
TRACE_SQL: Final = f"""
WITH (
    SELECT (min(first_ts), max(last_ts)) FROM {MESSAGES_ID_TS_TABLE} WHERE key = {{id:String}}
) AS span
SELECT id, kind, sender, recipient, conversation_id, step, trace_id, span_id,
       parent_span_id, ts, input_tokens, output_tokens, reason, payload
FROM {MESSAGES_TABLE} FINAL
WHERE ts BETWEEN span.1 AND span.2
  AND (conversation_id = {{id:String}} OR trace_id = {{id:String}} OR id = {{id:String}})
ORDER BY ts, id
LIMIT 10000
"""

# What `beamline trace ID` runs, in order, until one finds rows: a recent trace in one read;
# a conversation, an envelope, or a trace older than the copy's retention through the range.
TRACE_SQLS: Final = (TRACE_BY_TRACE_SQL, TRACE_SQL)

# The newest `limit` messages matching every filter given, returned oldest first: what
# `beamline logs` shows. The statement text never changes: an empty filter ('' or 0) is
# "no filter", written in SQL, and every value is a server-side parameter.
LOGS_SQL: Final = f"""
SELECT id, kind, sender, recipient, conversation_id, step, trace_id, span_id,
       parent_span_id, ts, input_tokens, output_tokens, reason, payload
FROM (
    SELECT id, kind, sender, recipient, conversation_id, step, trace_id, span_id,
           parent_span_id, ts, input_tokens, output_tokens, reason, payload
    FROM {MESSAGES_TABLE} FINAL
    WHERE ({{since_s:UInt32}} = 0 OR ts >= now64(6) - toIntervalSecond({{since_s:UInt32}}))
      AND ({{agent:String}} = '' OR sender = {{agent:String}} OR recipient = {{agent:String}})
      AND ({{kind:String}} = '' OR kind = {{kind:String}})
      AND ({{conversation:String}} = '' OR conversation_id = {{conversation:String}})
    ORDER BY ts DESC, id DESC
    LIMIT {{limit:UInt32}}
)
ORDER BY ts, id
"""
