"""The wire namespace, version 1: every subject, stream, consumer and header name.

Each subject position means one thing so wildcards work:
    bl.task.<role>                 a task for any agent of a role      (stream BL_TASKS)
    bl.agent.<agent>.inbox         a named agent's mailbox             (stream BL_MAILBOX,
                                   stored as bl.mbox.<shard>.<agent>)
    bl.journal.<agent>.<conv>      an agent's journaled steps          (stream BL_JOURNAL)
    bl.reply.<conv>                replies and task errors             (stream BL_REPLIES)
    bl.events.<source>.<event>     decisions and state changes         (stream BL_EVENTS)
    bl.dlq.<origin>                dead letters, reason in Bl-Reason   (stream BL_DLQ)
    bl.llm.<provider>              LLM requests (request/reply)        (core NATS)
    bl.query.sql                   read-only ClickHouse query          (core NATS)
    bl.svc.<service>.health        "what are you doing?"               (core NATS)
    bl.ctl.<host>.<command>        supervisor -> agent host commands    (core NATS)
    bl.sup.hb.<host>               host heartbeats                     (core NATS)
    bl.sup.exit                    host -> supervisor: a child exited  (core NATS)
    bl.admin.<command>             operator -> supervisor (ps, kill..) (core NATS)
    bl.budget.<command>            reserve (gateway), raise/show (operator) -> budget
                                                                       (core NATS)
    bl.sup.budget                  budget -> supervisor: stop a subtree (core NATS)
    bl.sup.guard                   loopguard -> supervisor: restart, suspend, resume or
                                   stop a looping agent                 (core NATS)
    bl.escalation.<agent>          loopguard -> humans: a loop to decide on (stream
                                   BL_ESCALATIONS)
    bl.loopguard.<command>         list, answer (operator) -> loopguard (core NATS)

Only the supervisor publishes on bl.ctl.>; hosts publish heartbeats and exits; operators
(the CLI) talk to the supervisor on bl.admin.>, which records and carries out their command.
"""

from __future__ import annotations

from typing import Final

from beamline.errors import CallerError, Reason
from beamline.ids import is_token

PREFIX: Final = "bl"
VERSION: Final = 1

# --- headers ---------------------------------------------------------------
H_MSG_ID: Final = "Nats-Msg-Id"  # = envelope id: JetStream de-duplication
H_TRACEPARENT: Final = "traceparent"  # W3C trace context
H_KIND: Final = "Bl-Kind"
# on a journal entry: how many entries its conversation had before it ("0": the first), so a
# reader that meets a conversation at its first entry knows there is nothing to replay
H_ENTRY: Final = "Bl-Entry"
H_REASON: Final = "Bl-Reason"  # on dead letters and error replies
H_SCHEMA: Final = "Bl-Schema"

# --- streams ---------------------------------------------------------------
STREAM_TASKS: Final = "BL_TASKS"
STREAM_MAILBOX: Final = "BL_MAILBOX"
STREAM_JOURNAL: Final = "BL_JOURNAL"
STREAM_REPLIES: Final = "BL_REPLIES"
STREAM_EVENTS: Final = "BL_EVENTS"
STREAM_DLQ: Final = "BL_DLQ"
STREAM_ESCALATIONS: Final = "BL_ESCALATIONS"
RECORDED_STREAMS: Final = (
    STREAM_TASKS,
    STREAM_MAILBOX,
    STREAM_JOURNAL,
    STREAM_REPLIES,
    STREAM_EVENTS,
    STREAM_DLQ,
    STREAM_ESCALATIONS,
)

# --- durable consumers -----------------------------------------------------
CONSUMER_DISPATCH: Final = "dispatch"  # role tasks -> agent mailboxes (shared by hosts)
CONSUMER_RECORDER: Final = "recorder"  # one per recorded stream
CONSUMER_BUDGET: Final = "budget"  # on BL_EVENTS: the gateway's call outcomes, settled
CONSUMER_LOOPGUARD: Final = "loopguard"  # on BL_JOURNAL: every agent's steps, watched


def mailbox_consumer(shard: int) -> str:
    return f"mbox-{shard}"


def pinned_consumer(agent: str) -> str:
    """The own mailbox consumer of an agent with placement labels or `isolation: process`
    (not in a shard)."""
    return f"agent-{token(agent, 'agent')}"


# Push consumers deliver here; outside every stream's subjects, one prefix per service.
DELIVER_DISPATCH: Final = "_bl.deliver.agent.dispatch"


def mailbox_deliver(host: str, shard: int) -> str:
    """Per host: a consumer re-created for a new owner no longer feeds the old one."""
    return f"_bl.deliver.agent.{token(host, 'host')}.mbox.{shard}"


def pinned_deliver(host: str, agent: str) -> str:
    return f"_bl.deliver.agent.{token(host, 'host')}.pin.{token(agent, 'agent')}"


# --- queue groups ----------------------------------------------------------
QUEUE_GATEWAY: Final = "gateway"
QUEUE_RECORDER: Final = "recorder"
QUEUE_BUDGET: Final = "budget"
QUEUE_LOOPGUARD: Final = "loopguard"

# --- subjects --------------------------------------------------------------
TASKS_ALL: Final = "bl.task.>"
INBOX_ALL: Final = "bl.agent.*.inbox"
JOURNAL_ALL: Final = "bl.journal.>"
REPLIES_ALL: Final = "bl.reply.>"
EVENTS_ALL: Final = "bl.events.>"
DLQ_ALL: Final = "bl.dlq.>"
ESCALATIONS_ALL: Final = "bl.escalation.>"
LLM_ALL: Final = "bl.llm.*"
QUERY: Final = "bl.query.sql"


def token(value: str, what: str) -> str:
    """Check that `value` can stand as one subject token; name `what` if it cannot."""
    if not is_token(value):
        raise CallerError(
            f"{what} {value!r} is not a valid name: use 1-128 of A-Z a-z 0-9 _ -",
            Reason.INVALID_SCHEMA,
        )
    return value


def task(role: str) -> str:
    return f"bl.task.{token(role, 'role')}"


def inbox(agent: str) -> str:
    return f"bl.agent.{token(agent, 'agent')}.inbox"


def mailbox_shard(shard: int) -> str:
    """What the mailbox stream stores inbox messages of one shard under."""
    return f"bl.mbox.{shard}.*"


def shard_of(agent: str, shards: int) -> int:
    """The shard the server's `partition(shards,1)` transform puts an agent's mailbox in:
    FNV-1a (32 bit) of the agent id, modulo the shard count, as nats-server computes it."""
    h = 0x811C9DC5
    for byte in agent.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % shards


def mailbox_of(agent: str) -> str:
    """One agent's stored mailbox messages, whatever its shard."""
    return f"bl.mbox.*.{token(agent, 'agent')}"


def mailbox_transform_dest(shards: int) -> str:
    return "bl.mbox.{{partition(" + str(shards) + ",1)}}.{{wildcard(1)}}"


def journal(agent: str, conversation: str) -> str:
    return f"bl.journal.{token(agent, 'agent')}.{token(conversation, 'conversation id')}"


def reply(conversation: str) -> str:
    return f"bl.reply.{token(conversation, 'conversation id')}"


def event(source: str, name: str) -> str:
    return f"bl.events.{token(source, 'event source')}.{token(name, 'event name')}"


def dlq(origin: str) -> str:
    return f"bl.dlq.{token(origin, 'origin')}"


def llm(provider: str) -> str:
    return f"bl.llm.{token(provider, 'provider')}"


def health(service: str) -> str:
    return f"bl.svc.{token(service, 'service')}.health"


def control(host: str, command: str) -> str:
    return f"bl.ctl.{token(host, 'host')}.{token(command, 'command')}"


def control_all(host: str) -> str:
    return f"bl.ctl.{token(host, 'host')}.>"


def heartbeat(host: str) -> str:
    return f"bl.sup.hb.{token(host, 'host')}"


HEARTBEATS_ALL: Final = "bl.sup.hb.*"
CHILD_EXIT: Final = "bl.sup.exit"
CONTROL_ALL: Final = "bl.ctl.>"
ADMIN_ALL: Final = "bl.admin.*"


def admin(command: str) -> str:
    return f"bl.admin.{token(command, 'command')}"


BUDGET_ALL: Final = "bl.budget.*"
BUDGET_RESERVE: Final = "bl.budget.reserve"  # the gateway, before each provider call
BUDGET_RAISE: Final = "bl.budget.raise"  # the operator
BUDGET_SHOW: Final = "bl.budget.show"  # the operator
SUBTREE_EXHAUSTED: Final = "bl.sup.budget"  # budget -> supervisor (the leader acks)
# the call outcomes the budget service settles reservations with
LLM_CALL_COMPLETED: Final = "bl.events.gateway.llm_call_completed"
LLM_CALL_FAILED: Final = "bl.events.gateway.llm_call_failed"


GUARD: Final = "bl.sup.guard"  # loopguard -> supervisor (the leader acts and answers)
LOOPGUARD_ALL: Final = "bl.loopguard.*"
LOOPGUARD_LIST: Final = "bl.loopguard.list"  # the operator (or a client)
LOOPGUARD_ANSWER: Final = "bl.loopguard.answer"  # the operator (or a client)


def escalation(agent: str) -> str:
    return f"bl.escalation.{token(agent, 'agent')}"


def last_token(subject: str, index: int) -> str:
    """The token at `index` of a subject (negative counts from the end)."""
    return subject.split(".")[index]


# --- key-value buckets -----------------------------------------------------
BUCKET_LLM_RESULTS: Final = "BL_LLM_RESULTS"  # gateway: request id -> response (idempotency)
BUCKET_ATTEMPTS: Final = "BL_ATTEMPTS"  # agent hosts: deliveries of a mailbox message by dead hosts
BUCKET_SUPERVISOR: Final = "BL_SUPERVISOR"  # supervisor: leader lease and the tree's state
BUCKET_BUDGET: Final = "BL_BUDGET"  # budget: the ledger (spend, reservations, raised limits)
BUCKET_BREAKERS: Final = "BL_BREAKERS"  # gateway: provider -> its breaker's state (hosts watch)
BUCKET_LOOPGUARD: Final = "BL_LOOPGUARD"  # loopguard: ladders, escalations, unsent commands
