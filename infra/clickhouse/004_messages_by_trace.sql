-- bl_messages_by_trace: the recent messages again, sorted by trace, so that finding one
-- trace (`beamline trace ID`, beamline.reads.TRACE_BY_TRACE_SQL) is one read of the few
-- granules that hold it.
--
-- Why a copy: bl_messages is sorted by time for the dashboards (see 001). Even with the
-- trace's time range from bl_messages_id_ts (003) a lookup is two reads, the range and then
-- the granules inside it, and on the embedded engine every MergeTree read costs ~7 ms
-- whatever it reads: 19.3 ms p50 / 28.1 ms p95 for one trace among 10M messages. Sorted by
-- trace, it is one read: 13.2 ms p50 / 19.1 ms p95 on the same data, interleaved, on a
-- loaded 2-core machine (bench/trace_lookup.py measures both), read without FINAL (see
-- beamline.reads.TRACE_BY_TRACE_SQL). The price is storage: as many bytes as bl_messages
-- itself (432 MiB against 431 MiB for 10M bench messages), which is why it has
-- its own, shorter retention (BEAMLINE_RETENTION_BL_MESSAGES_BY_TRACE_DAYS, default 30):
-- an older trace is still found through 003, at that path's speed.
--
-- Conversations and single envelopes are found through 003: a conversation spans many
-- traces, and one envelope is rarely what a person looks up.
--
-- Filled only by the materialized view below (the recorder's inserts into bl_messages, with
-- them, in the same insert), and once from the rows already there. Same engine, version
-- column and partitioning as bl_messages, so a duplicate collapses here as it does there
-- (reads de-duplicate by id until then) and a month goes with DROP PARTITION.
CREATE TABLE IF NOT EXISTS bl_messages_by_trace
(
    id              String,
    kind            LowCardinality(String),
    subject         String,
    sender          String,
    recipient       String,
    conversation_id String,
    step            UInt32,
    trace_id        String,
    span_id         String,
    parent_span_id  String,
    ts              DateTime64(6, 'UTC'),
    input_tokens    UInt32,
    output_tokens   UInt32,
    reason          LowCardinality(String),
    payload         String CODEC(ZSTD(3)),
    is_envelope     UInt8
)
ENGINE = ReplacingMergeTree(is_envelope)
PARTITION BY toYYYYMM(ts)
ORDER BY (trace_id, ts, id);

CREATE MATERIALIZED VIEW IF NOT EXISTS bl_messages_by_trace_mv
TO bl_messages_by_trace
AS SELECT id, kind, subject, sender, recipient, conversation_id, step, trace_id, span_id,
          parent_span_id, ts, input_tokens, output_tokens, reason, payload, is_envelope
FROM bl_messages
WHERE trace_id != '';

-- The messages stored before this file was applied (none in a new database), after the view
-- exists so that no insert falls between the two. A message inserted while this runs can be
-- copied twice: the read keeps one row per id, and a merge collapses it, as in bl_messages.
INSERT INTO bl_messages_by_trace
SELECT id, kind, subject, sender, recipient, conversation_id, step, trace_id, span_id,
       parent_span_id, ts, input_tokens, output_tokens, reason, payload, is_envelope
FROM bl_messages
WHERE trace_id != '';
