-- otel_traces: spans in the OpenTelemetry Collector ClickHouse exporter's schema, so the
-- Grafana ClickHouse plugin's trace view (and any tool reading the exporter's tables) reads
-- them unchanged.
--
-- Followed: opentelemetry-collector-contrib exporter/clickhouseexporter/internal/
-- sql_templates/traces_table.sql, traces_id_ts_lookup_table.sql and traces_id_ts_lookup_mv.sql
-- (column names, types, codecs, indexes, PARTITION BY, the lookup table and its view), with
-- Duration UInt64 (nanoseconds) as the current template has it (older ones used Int64).
--
-- Written only by the recorder, from recorded envelopes (beamline.spans): in the same flush
-- as the messages, after their insert, before the ack, with an insert de-duplication token
-- of its own.
--
-- Retention is the exporter's TTL, toDateTime(Timestamp) + toIntervalDay(N) on otel_traces and
-- the same N on the lookup table (on End: a lookup row lives as long as the spans it finds).
-- Every migration sets it (beamline.storage.set_retention) from
-- BEAMLINE_RETENTION_OTEL_TRACES_DAYS, default 30 days, 0 for none. With daily partitions and
-- ttl_only_drop_parts, expired spans go a whole part at a time, without rewriting parts.
--
-- The sorting key is the exporter's, and it fits our reads: the dashboards' trace searches
-- (dashboards/build.py: tasks, supervisor decisions) filter ServiceName = '...' and a
-- SpanName prefix, which the primary index narrows to that service's spans of that name, and
-- a time range, which the daily partitions narrow to its days. One trace by id (the plugin's
-- trace view) is the bloom filter on TraceId, within the time range the lookup table gives.
--
-- Adapted to an embedded chDB / single MergeTree server (no cluster):
-- - ENGINE = ReplacingMergeTree and ORDER BY the exporter's key plus SpanId. A span's
--   identity is deterministic (SpanId is the envelope's or the task's span, Timestamp and
--   Duration come from recorded values), so the same span written twice is the same sorting
--   key and collapses on merge. The recorder does not write it twice in the first place:
--   spans of redelivered messages, and of task outcomes (recorded from two streams), are
--   looked up by SpanId first. Count spans with `uniqExact(SpanId)` or FROM otel_traces FINAL.
-- - one extra skip index, on SpanId, for that look-up.
-- - non_replicated_deduplication_window, as for bl_messages: a retried span insert with the
--   same token adds 0 rows.
CREATE TABLE IF NOT EXISTS otel_traces
(
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested
    (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested
    (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_span_id SpanId TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), SpanId)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1,
    non_replicated_deduplication_window = 1000;

-- The exporter's trace-id lookup: a trace's time range, to narrow the otel_traces read of
-- one trace to its partitions. Rows per insert block, not per trace: read it with
-- min(Start) / max(End) ... GROUP BY TraceId, as the plugin does. A duplicate row cannot
-- change that answer, so it stays a plain MergeTree as in the exporter.
CREATE TABLE IF NOT EXISTS otel_traces_trace_id_ts
(
    TraceId String CODEC(ZSTD(1)),
    Start DateTime CODEC(Delta, ZSTD(1)),
    End DateTime CODEC(Delta, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(Start)
ORDER BY (TraceId, Start)
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1;

CREATE MATERIALIZED VIEW IF NOT EXISTS otel_traces_trace_id_ts_mv
TO otel_traces_trace_id_ts
AS SELECT
    TraceId,
    min(Timestamp) AS Start,
    max(Timestamp) AS End
FROM otel_traces
WHERE TraceId != ''
GROUP BY TraceId;
