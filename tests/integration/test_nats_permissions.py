"""NATS least privilege, enforced by a real nats-server running the generated config.

The server gets `nats_auth.render(...)` exactly as the containers do: passwords as
`$NATS_<USER>_PASSWORD` references, resolved from its environment. Two client users (alice,
bob) stand for two customers. Every denial is the server's own permissions violation,
reported to the client's error callback; every allowed operation is shown to succeed (a
JetStream ack, a delivered message, an answered request), so each test can fail both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import SecretStr

from beamline import bus, client, nats_auth, streams, subjects
from beamline.envelope import Envelope, Kind, ReplyPayload
from beamline.errors import TransientError
from beamline.journal import read_entries
from beamline.nats_auth import Role
from beamline.nats_credentials import Credentials
from beamline.settings import MeshSettings
from beamline.testing import NatsServer, free_port, mesh_env, start_service, wait_for

ROOT = Path(__file__).resolve().parents[2]
USERS = nats_auth.default_users(clients=("alice", "bob"))
BY_NAME = {u.name: u for u in USERS}


@dataclass
class Conn:
    """One user's connection and the errors the server reported to it."""

    user: str
    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def denied(self, op: str, subject: str) -> None:
        needle = f'{op} to "{subject}"'.lower()  # nats-py lowercases the server's text
        await wait_for(
            lambda: any("permissions violation" in e and needle in e for e in self.errors),
            timeout=5,
            what=f"the server to deny {self.user}: {needle}",
        )


Connect = Callable[[str], Awaitable[Conn]]


@pytest.fixture
def passwords(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A password per user, exported as the server's NATS_<USER>_PASSWORD (a letter first:
    nats-server parses the value as a config token)."""
    chosen = {u.name: f"p{secrets.token_hex(16)}" for u in USERS}
    for user in USERS:
        monkeypatch.setenv(user.password_env, chosen[user.name])
    return chosen


@pytest.fixture
def server(tmp_path: Path, passwords: dict[str, str]) -> Iterator[NatsServer]:
    conf = tmp_path / "auth.conf"
    conf.write_text(nats_auth.render(USERS))
    srv = NatsServer(
        port=free_port(),
        store=tmp_path / "nats",
        log_dir=tmp_path / "logs",
        extra_args=["-c", str(conf)],
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def connect(server: NatsServer, passwords: dict[str, str]) -> AsyncIterator[Connect]:
    """Connect as a user (with that user's inbox prefix, as bus.connect does); the layout is
    declared first, by the init user."""
    conns: list[Conn] = []

    async def open_(user: str) -> Conn:
        conn = Conn(user, NATS())

        async def on_error(exc: Exception) -> None:
            conn.errors.append(str(exc).lower())

        await conn.nc.connect(
            server.url,
            user=user,
            password=passwords[user],
            inbox_prefix=nats_auth.inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        conns.append(conn)
        return conn

    init = await open_("init")
    await streams.ensure_streams(init.nc.jetstream(), MeshSettings().mailbox_shards)
    try:
        yield open_
    finally:
        for conn in conns:
            await conn.nc.close()


def envelope(conversation: str, text: str = "hi") -> Envelope:
    return Envelope(
        kind=Kind.REPLY,
        sender="writer",
        recipient="cli",
        conversation_id=conversation,
        payload=ReplyPayload(task_id="t1", text=text),
    )


# --- denied --------------------------------------------------------------------------------

PUB, SUB = "publish", "subscription"
DENIED = [
    ("agent", PUB, subjects.control("host-1", "restart")),
    ("agent", PUB, subjects.event("supervisor", "child_restarted")),
    ("agent", PUB, subjects.admin("kill")),
    ("agent", PUB, "$KV.BL_SUPERVISOR.leader"),
    ("agent", PUB, "$KV.BL_BREAKERS.openai"),  # it watches breaker states, never writes them
    ("agent", PUB, "$JS.API.STREAM.DELETE.BL_JOURNAL"),
    ("agent", SUB, subjects.LLM_ALL),
    ("agent", SUB, "_INBOX.gateway.>"),
    ("supervisor", PUB, subjects.task("research")),
    ("supervisor", PUB, subjects.journal("writer", "c1")),
    ("supervisor", PUB, subjects.event("gateway", "breaker_opened")),
    ("supervisor", SUB, subjects.REPLIES_ALL),
    ("gateway", PUB, subjects.control("host-1", "stop")),
    ("gateway", PUB, subjects.reply("c1")),
    ("gateway", PUB, subjects.event("agent", "x")),
    ("gateway", SUB, subjects.QUERY),
    ("gateway", PUB, subjects.BUDGET_RAISE),  # it may ask for reservations, nothing else
    ("gateway", PUB, subjects.SUBTREE_EXHAUSTED),
    ("recorder", PUB, subjects.task("research")),
    ("recorder", PUB, subjects.event("gateway", "x")),
    ("recorder", PUB, "$JS.API.STREAM.PURGE.BL_TASKS"),
    ("recorder", SUB, subjects.LLM_ALL),
    ("agent", PUB, subjects.BUDGET_RESERVE),  # only the gateway reserves
    ("budget", PUB, subjects.control("host-1", "stop")),  # it asks the supervisor instead
    ("budget", PUB, subjects.event("gateway", "llm_call_completed")),  # no forged usage
    ("budget", PUB, subjects.admin("restart")),
    ("budget", PUB, subjects.llm("openai")),
    ("budget", PUB, "$KV.BL_SUPERVISOR.tree"),
    ("budget", PUB, "$JS.API.STREAM.PURGE.BL_EVENTS"),
    ("budget", SUB, subjects.BUDGET_ALL),  # only in its queue group
    ("budget", SUB, subjects.EVENTS_ALL),  # events come through its durable consumer
    ("loopguard", PUB, subjects.control("host-1", "stop")),  # it asks the supervisor instead
    ("loopguard", PUB, subjects.admin("restart")),
    ("loopguard", PUB, subjects.journal("writer", "c1")),  # it reads journals, never writes
    ("loopguard", PUB, subjects.event("supervisor", "child_restarted")),
    ("loopguard", PUB, "$KV.BL_SUPERVISOR.tree"),
    ("loopguard", PUB, "$JS.API.STREAM.PURGE.BL_JOURNAL"),
    ("loopguard", PUB, f"$JS.API.CONSUMER.MSG.NEXT.BL_JOURNAL.{subjects.CONSUMER_RECORDER}"),
    ("loopguard", SUB, subjects.JOURNAL_ALL),  # entries come through its durable consumer
    ("loopguard", SUB, subjects.LOOPGUARD_ALL),  # only in its queue group
    ("agent", PUB, subjects.GUARD),  # only the loop guard commands the supervisor so
    ("budget", PUB, subjects.GUARD),
    ("admin", PUB, subjects.GUARD),
    ("alice", PUB, subjects.GUARD),
    ("alice", PUB, subjects.escalation("writer")),  # humans answer; they do not escalate
    ("gateway", SUB, subjects.ESCALATIONS_ALL),
    ("alice", PUB, subjects.BUDGET_RAISE),
    ("alice", PUB, subjects.QUERY),
    ("alice", PUB, subjects.llm("openai")),
    ("alice", PUB, subjects.journal("writer", "c1")),
    ("alice", SUB, subjects.REPLIES_ALL),
    ("alice", SUB, subjects.EVENTS_ALL),
    ("admin", PUB, subjects.control("host-1", "restart")),
    ("admin", PUB, subjects.journal("writer", "c1")),
    ("admin", PUB, "$JS.API.STREAM.DELETE.BL_TASKS"),
    ("admin", SUB, "_INBOX.agent.>"),
    ("init", PUB, subjects.task("research")),
    ("init", PUB, "$JS.API.STREAM.DELETE.BL_TASKS"),
    ("init", SUB, subjects.REPLIES_ALL),
]


@pytest.mark.parametrize(("user", "op", "subject"), DENIED)
async def test_each_role_is_denied_what_is_outside_its_rights(
    connect: Connect, user: str, op: str, subject: str
) -> None:
    rights = BY_NAME[user].rights()
    assert not (rights.may_publish(subject) if op == PUB else rights.may_subscribe(subject))
    conn = await connect(user)
    if op == PUB:
        await conn.nc.publish(subject, b"{}")
    else:
        await conn.nc.subscribe(subject)
    await conn.nc.flush()
    await conn.denied(op, subject)


def test_every_role_has_a_denial_above() -> None:
    assert {BY_NAME[user].role for user, _, _ in DENIED} == set(Role)


# --- forging and eavesdropping -------------------------------------------------------------


async def test_an_agent_host_cannot_forge_a_supervisor_command(connect: Connect) -> None:
    host, forger, supervisor = (
        await connect("agent"),
        await connect("agent"),
        await connect("supervisor"),
    )
    commands = await host.nc.subscribe(subjects.control_all("host-1"))
    await host.nc.flush()
    restart = subjects.control("host-1", "restart")

    await forger.nc.publish(restart, b"forged")
    await forger.nc.flush()
    await forger.denied(PUB, restart)  # the server has seen and refused it
    await supervisor.nc.publish(restart, b"from the supervisor")

    # Had the forged command passed, it would be first: the server routes a publish to its
    # subscribers before it answers the publisher's flush.
    first = await commands.next_msg(timeout=5)
    assert first.data == b"from the supervisor"


async def test_a_crafted_reply_subject_cannot_make_a_service_answer_outside_inboxes(
    connect: Connect,
) -> None:
    host, agent, gateway, supervisor = (
        await connect("agent"),
        await connect("agent"),
        await connect("gateway"),
        await connect("supervisor"),
    )
    restart = subjects.control("host-1", "restart")
    commands = await host.nc.subscribe(subjects.control_all("host-1"))

    async def answer(msg: Msg) -> None:
        await msg.respond(b"llm answer")  # what the gateway does with every request

    await gateway.nc.subscribe(subjects.LLM_ALL, queue=subjects.QUEUE_GATEWAY, cb=answer)
    for conn in (host, gateway):
        await conn.nc.flush()

    # an LLM request whose reply subject is a host's control subject
    await agent.nc.publish(subjects.llm("fakellm"), b"{}", reply=restart)
    await gateway.denied(PUB, restart)
    await supervisor.nc.publish(restart, b"from the supervisor")
    assert (await commands.next_msg(timeout=5)).data == b"from the supervisor"


async def test_a_client_cannot_read_another_clients_replies(connect: Connect) -> None:
    alice, bob, agent = await connect("alice"), await connect("bob"), await connect("agent")
    reply_to = alice.nc.new_inbox()  # what alice puts in a task's reply_to
    assert reply_to.startswith("_INBOX.alice.")
    mine = await alice.nc.subscribe(reply_to)
    await alice.nc.flush()

    for subject in ("_INBOX.alice.>", reply_to, subjects.REPLIES_ALL, subjects.reply("c1")):
        await bob.nc.subscribe(subject)
        await bob.nc.flush()
        await bob.denied(SUB, subject)
    for api in ("$JS.API.STREAM.NAMES", "$JS.API.CONSUMER.CREATE.BL_REPLIES"):
        await bob.nc.publish(api, b"{}")  # reading the replies stream instead
        await bob.nc.flush()
        await bob.denied(PUB, api)

    await agent.nc.publish(reply_to, bus.encode(envelope("c1", "for alice")))
    got = bus.decode((await mine.next_msg(timeout=5)).data, 10**6)
    assert isinstance(got.payload, ReplyPayload) and got.payload.text == "for alice"


# --- allowed: each role's work succeeds ------------------------------------------------------


async def test_a_client_submits_tasks_and_hosts_dispatch_journal_and_reply(
    connect: Connect,
) -> None:
    alice, agent, admin = await connect("alice"), await connect("agent"), await connect("admin")
    a_js, js = alice.nc.jetstream(), agent.nc.jetstream()
    assert (await a_js.publish(subjects.task("research"), b"a task")).stream == "BL_TASKS"
    assert (await a_js.publish(subjects.inbox("writer"), b"hi")).stream == "BL_MAILBOX"

    # the dispatch consumer, bound with a deliver group, as the agent host binds it
    config = ConsumerConfig(
        durable_name=subjects.CONSUMER_DISPATCH,
        filter_subject=subjects.TASKS_ALL,
        deliver_subject=subjects.DELIVER_DISPATCH,
        deliver_group=subjects.CONSUMER_DISPATCH,
        ack_policy=AckPolicy.EXPLICIT,
    )
    await js.add_consumer(subjects.STREAM_TASKS, config)
    sub = await js.subscribe_bind(
        subjects.STREAM_TASKS, config, subjects.CONSUMER_DISPATCH, manual_ack=True
    )
    task = await sub.next_msg(timeout=5)
    assert task.data == b"a task"
    await task.ack_sync(timeout=5)

    for subject in (subjects.journal("writer", "c1"), subjects.reply("c1"), subjects.dlq("agent")):
        await bus.publish(js, subject, envelope("c1"))
    await bus.publish(js, subjects.event("agent", "agent_started"), envelope("c1"))
    attempts = await js.key_value(subjects.BUCKET_ATTEMPTS)
    await attempts.put("mbox.1", b"2")
    assert (await attempts.get("mbox.1")).value == b"2"
    journal = await js.get_msg(
        subjects.STREAM_JOURNAL,
        seq=1,
        subject=subjects.journal("writer", "c1"),
        next=True,
        direct=True,
    )
    assert journal.data is not None

    # the operator reads the reply from the stream, as `beamline submit --wait` does
    reply = await client.await_reply(admin.nc, "c1", timeout=5)
    assert isinstance(reply.payload, ReplyPayload) and reply.payload.text == "hi"
    assert not agent.errors and not alice.errors and not admin.errors


async def test_the_supervisor_commands_hosts_and_hears_their_heartbeats_and_exits(
    connect: Connect,
) -> None:
    supervisor, agent, admin = (
        await connect("supervisor"),
        await connect("agent"),
        await connect("admin"),
    )
    beats = await supervisor.nc.subscribe(subjects.HEARTBEATS_ALL)

    async def ack_exit(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    async def answer_command(msg: Msg) -> None:
        await msg.respond(b'{"ok": true, "host": "host-1"}')

    async def answer_admin(msg: Msg) -> None:
        await msg.respond(b'{"ok": true, "result": []}')

    await supervisor.nc.subscribe(subjects.CHILD_EXIT, cb=ack_exit)
    await supervisor.nc.subscribe(subjects.ADMIN_ALL, cb=answer_admin)
    await agent.nc.subscribe(subjects.control_all("host-1"), cb=answer_command)
    await supervisor.nc.flush()
    await agent.nc.flush()

    await agent.nc.publish(subjects.heartbeat("host-1"), b"{}")
    assert (await beats.next_msg(timeout=5)).subject == subjects.heartbeat("host-1")
    assert (await agent.nc.request(subjects.CHILD_EXIT, b"{}", timeout=5)).data == b'{"ok": true}'
    answer = await supervisor.nc.request(subjects.control("host-1", "agents"), b"{}", timeout=5)
    assert json.loads(answer.data)["host"] == "host-1"
    assert json.loads((await admin.nc.request(subjects.admin("ps"), b"{}", timeout=5)).data)["ok"]

    js = supervisor.nc.jetstream()
    lease = await js.key_value(subjects.BUCKET_SUPERVISOR)
    revision = await lease.create("leader", b"sv-1")
    assert await lease.update("leader", b"sv-1", last=revision)
    await bus.publish(js, subjects.event("supervisor", "child_restarted"), envelope("c1"))
    assert not supervisor.errors and not agent.errors and not admin.errors


async def test_the_gateway_answers_llm_calls_and_the_recorder_records_and_answers_queries(
    connect: Connect,
) -> None:
    gateway, recorder = await connect("gateway"), await connect("recorder")
    agent, admin, alice = await connect("agent"), await connect("admin"), await connect("alice")

    async def answer_llm(msg: Msg) -> None:
        await msg.respond(b"llm answer")

    async def answer_query(msg: Msg) -> None:
        await msg.respond(b'{"columns": [], "rows": []}')

    async def answer_health(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    await gateway.nc.subscribe(subjects.LLM_ALL, queue=subjects.QUEUE_GATEWAY, cb=answer_llm)
    await recorder.nc.subscribe(subjects.QUERY, queue=subjects.QUEUE_RECORDER, cb=answer_query)
    await agent.nc.subscribe(subjects.health("agent"), queue="agent", cb=answer_health)
    for conn in (gateway, recorder, agent):
        await conn.nc.flush()

    assert (await agent.nc.request(subjects.llm("fakellm"), b"{}", timeout=5)).data == b"llm answer"
    assert (await admin.nc.request(subjects.QUERY, b"{}", timeout=5)).data.startswith(b"{")
    assert (
        await admin.nc.request(subjects.health("agent"), b"", timeout=5)
    ).data == b'{"ok": true}'

    g_js = gateway.nc.jetstream()
    results = await g_js.key_value(subjects.BUCKET_LLM_RESULTS)
    await results.put("req-1", b"cached")
    assert (await results.get("req-1")).value == b"cached"
    await bus.publish(g_js, subjects.event("gateway", "breaker_opened"), envelope("c1"))
    await bus.publish(g_js, subjects.dlq("gateway"), envelope("c1"))

    # the gateway writes each breaker's state; an agent host watches them
    watcher = await (await agent.nc.jetstream().key_value(subjects.BUCKET_BREAKERS)).watchall()
    breakers = await g_js.key_value(subjects.BUCKET_BREAKERS)
    await breakers.put("fakellm", b'{"state": "open"}')
    seen = None
    while seen is None:  # a None first: the replay of the (empty) bucket ended
        seen = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
    assert seen.key == "fakellm" and seen.value == b'{"state": "open"}'
    await watcher.stop()  # type: ignore[no-untyped-call]

    # the recorder's durable pull consumer: declare, pull, ack
    await alice.nc.jetstream().publish(subjects.task("research"), b"to record")
    r_js = recorder.nc.jetstream()
    puller = await r_js.pull_subscribe(
        subjects.TASKS_ALL, durable=subjects.CONSUMER_RECORDER, stream=subjects.STREAM_TASKS
    )
    (msg,) = await puller.fetch(1, timeout=5)
    assert msg.data == b"to record"
    await msg.ack_sync(timeout=5)
    await bus.publish(r_js, subjects.event("recorder", "lagging"), envelope("c1"))
    for conn in (gateway, recorder, agent, admin, alice):
        assert not conn.errors, (conn.user, conn.errors)


async def test_the_budget_service_reserves_settles_from_events_and_reports_to_the_supervisor(
    connect: Connect,
) -> None:
    budget, gateway, supervisor = (
        await connect("budget"),
        await connect("gateway"),
        await connect("supervisor"),
    )
    admin = await connect("admin")

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    await budget.nc.subscribe(subjects.BUDGET_ALL, queue=subjects.QUEUE_BUDGET, cb=answer)
    await budget.nc.subscribe(subjects.health("budget"), queue="budget", cb=answer)
    await supervisor.nc.subscribe(subjects.SUBTREE_EXHAUSTED, cb=answer)
    for conn in (budget, supervisor):
        await conn.nc.flush()
    assert (await gateway.nc.request(subjects.BUDGET_RESERVE, b"{}", timeout=5)).data
    assert (await admin.nc.request(subjects.BUDGET_RAISE, b"{}", timeout=5)).data
    assert (await admin.nc.request(subjects.BUDGET_SHOW, b"{}", timeout=5)).data
    assert (await budget.nc.request(subjects.health("budget"), b"", timeout=5)).data
    assert (await budget.nc.request(subjects.SUBTREE_EXHAUSTED, b"{}", timeout=5)).data

    # the gateway's call events, through its durable consumer: declare, pull, ack
    g_js, b_js = gateway.nc.jetstream(), budget.nc.jetstream()
    await bus.publish(g_js, subjects.LLM_CALL_COMPLETED, envelope("c1"))
    events = await b_js.pull_subscribe(
        "bl.events.gateway.>", durable=subjects.CONSUMER_BUDGET, stream=subjects.STREAM_EVENTS
    )
    (msg,) = await events.fetch(1, timeout=5)
    await msg.ack_sync(timeout=5)
    ledger = await b_js.key_value(subjects.BUCKET_BUDGET)
    revision = await ledger.create("ledger", b"{}")
    await ledger.update("ledger", b"{}", last=revision)
    await bus.publish(b_js, subjects.event("budget", "budget_raised"), envelope("c1"))
    for conn in (budget, gateway, supervisor, admin):
        assert not conn.errors, (conn.user, conn.errors)


async def test_the_loop_guard_watches_the_journal_commands_the_supervisor_and_escalates(
    connect: Connect,
) -> None:
    guard, agent, supervisor = (
        await connect("loopguard"),
        await connect("agent"),
        await connect("supervisor"),
    )
    alice, admin = await connect("alice"), await connect("admin")

    async def answer(msg: Msg) -> None:
        await msg.respond(b'{"ok": true}')

    await guard.nc.subscribe(subjects.LOOPGUARD_ALL, queue=subjects.QUEUE_LOOPGUARD, cb=answer)
    await guard.nc.subscribe(subjects.health("loopguard"), queue="loopguard", cb=answer)
    await supervisor.nc.subscribe(subjects.GUARD, cb=answer)
    for conn in (guard, supervisor):
        await conn.nc.flush()
    assert (await guard.nc.request(subjects.GUARD, b"{}", timeout=5)).data
    assert (await guard.nc.request(subjects.health("loopguard"), b"", timeout=5)).data
    for human in (alice, admin):  # a human answers with a client user, or the operator's
        assert (await human.nc.request(subjects.LOOPGUARD_ANSWER, b"{}", timeout=5)).data
        assert (await human.nc.request(subjects.LOOPGUARD_LIST, b"{}", timeout=5)).data

    # the journal, through its durable consumer (`services.loopguard.feed`): declared from a
    # position, pulled, inspected, deleted and declared again; and a conversation replayed
    # by direct gets
    a_js, g_js = agent.nc.jetstream(), guard.nc.jetstream()
    await bus.publish(a_js, subjects.journal("writer", "c1"), envelope("c1"))
    for _ in range(2):
        with contextlib.suppress(NotFoundError):
            await g_js.delete_consumer(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD)
        await g_js.add_consumer(
            subjects.STREAM_JOURNAL,
            ConsumerConfig(
                durable_name=subjects.CONSUMER_LOOPGUARD,
                filter_subject=subjects.JOURNAL_ALL,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=1,
                ack_policy=AckPolicy.NONE,
            ),
        )
        entries = await g_js.pull_subscribe_bind(
            durable=subjects.CONSUMER_LOOPGUARD, stream=subjects.STREAM_JOURNAL
        )
        (entry,) = await entries.fetch(1, timeout=5)
        await entries.unsubscribe()
        assert entry.metadata.sequence.stream == 1
        info = await g_js.consumer_info(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD)
        assert info.delivered is not None and info.delivered.stream_seq == 1
    replayed = await read_entries(g_js, subjects.journal("writer", "c1"))
    assert [env.conversation_id for _, env in replayed] == ["c1"]
    assert (await g_js.stream_info(subjects.STREAM_JOURNAL)).state.last_seq == 1
    state = await g_js.key_value(subjects.BUCKET_LOOPGUARD)
    revision = await state.create("state", b"{}")
    await state.update("state", b"{}", last=revision)
    await bus.publish(g_js, subjects.event("loopguard", "loop_detected"), envelope("c1"))

    # an escalation reaches a human's plain subscription, and is persisted
    watching = await alice.nc.subscribe(subjects.escalation("writer"))
    await alice.nc.flush()
    ack = await bus.publish(g_js, subjects.escalation("writer"), envelope("c1"))
    assert ack.stream == subjects.STREAM_ESCALATIONS
    assert (await watching.next_msg(timeout=5)).subject == subjects.escalation("writer")
    for conn in (guard, agent, supervisor, alice, admin):
        assert not conn.errors, (conn.user, conn.errors)


async def test_the_operator_declares_the_layout_and_lists_consumers(connect: Connect) -> None:
    admin = await connect("admin")
    js = admin.nc.jetstream()
    await streams.ensure_streams(js, MeshSettings().mailbox_shards)  # what `beamline up` does
    assert [c.name for c in await js.consumers_info(subjects.STREAM_MAILBOX)] == []
    assert not admin.errors


SERVICE_USERS = [role.value for role in nats_auth.SERVICE_ROLES.values()]


@pytest.mark.parametrize("user", SERVICE_USERS)
async def test_a_service_may_look_up_the_layout_it_uses_but_not_create_or_update_any(
    connect: Connect, user: str
) -> None:
    conn, admin = await connect(user), await connect("admin")
    js = conn.nc.jetstream(timeout=1)  # a denied API request is never answered: time out soon
    # what it does at start: every stream and bucket it uses is there (allowed lookups)
    await streams.require_layout(js, nats_auth.USES[Role(user)], wait_s=0)
    assert not conn.errors

    shards = MeshSettings().mailbox_shards
    (mailbox,) = (c for c in streams.stream_configs(shards) if c.name == subjects.STREAM_MAILBOX)
    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "$JS.API.STREAM.CREATE.BL_ROGUE": lambda: js.add_stream(
            StreamConfig(name="BL_ROGUE", subjects=["rogue.>"])
        ),
        "$JS.API.STREAM.CREATE.BL_MAILBOX": lambda: js.add_stream(mailbox.evolve(max_age=60.0)),
        "$JS.API.STREAM.UPDATE.BL_MAILBOX": lambda: js.update_stream(mailbox.evolve(max_age=60.0)),
        "$JS.API.STREAM.CREATE.KV_BL_ROGUE": lambda: js.create_key_value(
            KeyValueConfig(bucket="BL_ROGUE")
        ),
    }
    for subject, attempt in attempts.items():
        with pytest.raises(TimeoutError):
            await attempt()
        await conn.denied(PUB, subject)

    held = {str(i.config.name): i.config for i in await admin.nc.jetstream().streams_info()}
    assert "BL_ROGUE" not in held and "KV_BL_ROGUE" not in held
    assert held[subjects.STREAM_MAILBOX].max_age == mailbox.max_age  # not re-declared
    assert not admin.errors


# --- connecting ------------------------------------------------------------------------------


async def test_bus_connect_uses_the_users_own_inbox(
    server: NatsServer, passwords: dict[str, str], connect: Connect
) -> None:
    # (`connect` has the init user declare the streams)
    who = Credentials(user="alice", password=SecretStr(passwords["alice"]))
    nc = await bus.connect(server.url, "test", who, give_up_s=10)
    try:
        assert nc.new_inbox().startswith("_INBOX.alice.")
        ack = await nc.jetstream().publish(subjects.task("research"), b"x")  # acked into it
        assert ack.stream == subjects.STREAM_TASKS
    finally:
        await nc.close()


async def test_wrong_credentials_are_retried_with_backoff_and_the_password_never_logged(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = Credentials(user="agent", password=SecretStr("not-the-password"))

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused user 'agent'" in r.getMessage()]

    with caplog.at_level(logging.ERROR, logger="beamline.bus"):
        connecting = asyncio.ensure_future(bus.connect(server.url, "test", wrong))
        try:
            await wait_for(lambda: len(refusals()) >= 3, timeout=15, what="three refusals")
            assert not connecting.done()  # still trying: a service waits for fixed credentials
        finally:
            connecting.cancel()
            await asyncio.wait({connecting})
    waits = [float(r.__dict__["retry_in_s"]) for r in refusals()]
    assert waits == sorted(waits) and waits[0] <= 0.5  # backing off
    assert "NATS_AGENT_PASSWORD" in refusals()[0].getMessage()  # what to check
    assert "not-the-password" not in caplog.text


async def test_a_cli_command_with_wrong_credentials_stops_at_once_naming_the_user(
    server: NatsServer,
) -> None:
    wrong = Credentials(user="admin", password=SecretStr("not-the-password"))
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        await bus.connect(server.url, "beamline-cli", wrong, give_up_s=10)
    assert time.monotonic() - started < 5  # not after the whole 10 s
    assert "refused user 'admin'" in str(err.value) and "NATS_ADMIN_PASSWORD" in str(err.value)
    assert "not-the-password" not in str(err.value)


async def test_a_service_with_wrong_credentials_waits_and_says_why_instead_of_crash_looping(
    server: NatsServer, tmp_path: Path
) -> None:
    env = mesh_env(
        server.url,
        tmp_path / "data",
        BEAMLINE_NATS_USER="gateway",
        BEAMLINE_NATS_PASSWORD="not-the-password",
        BEAMLINE_CONFIG=str(ROOT / "infra/examples/research-team.yaml"),
    )
    proc = start_service("gateway", env, tmp_path / "logs")
    try:

        def refusals() -> list[dict[str, object]]:
            lines = [json.loads(x) for x in proc.logs().splitlines() if x.startswith("{")]
            return [x for x in lines if "refused user 'gateway'" in str(x.get("msg"))]

        seen = await wait_for(lambda: len(refusals()) >= 3 and refusals(), timeout=20)
        assert proc.alive()  # waiting with backoff, not exiting to be restarted in a loop
        waits = [float(str(r["retry_in_s"])) for r in seen]
        assert waits == sorted(waits)
        assert "not-the-password" not in proc.logs()
    finally:
        proc.kill()
