"""Supervision scenarios on a real mesh: nats-server, fakellm over HTTP, gateway, recorder,
supervisor(s) and agent host(s) as processes. Modelled on OTP's supervisor suite: a crash
restarts the child; intensity exceeded escalates to the parent; a lost host's agents are
re-homed; a hung agent is killed and restarted; a standby supervisor takes over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from beamline import nats_auth, subjects
from beamline.client import await_reply, reply_text, submit
from beamline.testing import wait_for
from tests.integration.conftest import MeshFactory, MeshHandle

HERE = Path(__file__).parent
TREE = HERE / "supervised.yaml"
SCRIPT = HERE / "supervised-script.yaml"
FAST = {
    "BEAMLINE_AGENT_HOST_ID": "host-a",
    "BEAMLINE_AGENT_LABELS": "tier=hot",
    "BEAMLINE_AGENT_HEARTBEAT_S": "0.1",
    "BEAMLINE_SUPERVISOR_INSTANCE_ID": "sup-1",
    "BEAMLINE_SUPERVISOR_SETTLE_S": "0.3",
    "BEAMLINE_SUPERVISOR_HUNG_AFTER_S": "4",
}


async def supervised_mesh(start_mesh: MeshFactory, **env: str) -> MeshHandle:
    mesh: MeshHandle = await start_mesh(config=TREE, script=SCRIPT, env={**FAST, **env})
    await wait_for(lambda: started(mesh, "doomed"), timeout=20, what="the tree to start")
    return mesh


async def events(mesh: MeshHandle) -> list[dict[str, Any]]:
    """Every supervisor event so far, oldest first, as {event, **data}."""
    return await mesh.events("bl.events.supervisor.>")


async def started(mesh: MeshHandle, agent: str) -> bool:
    return any(
        e["event"] in ("child_started", "agent_rehomed") and e.get("child") == agent
        for e in await events(mesh)
    )


async def admin(
    mesh: MeshHandle, command: str, target: str | None = None, **extra: Any
) -> dict[str, Any]:
    body = json.dumps({"target": target, "requested_by": "test", **extra}).encode()
    reply = await mesh.nc.request(subjects.admin(command), body, timeout=20)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


def named(evs: list[dict[str, Any]], event: str, child: str | None = None) -> list[dict[str, Any]]:
    return [e for e in evs if e["event"] == event and (child is None or e.get("child") == child)]


async def test_a_crashed_agent_is_restarted_and_finishes_its_task(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    conversation = await submit(mesh.nc, subjects.inbox("crasher"), "k1")
    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "crasher: survived k1"

    evs = await events(mesh)
    [exited] = named(evs, "child_exited", "crasher")
    assert exited["supervisor"] == "root" and "crash_once('k1')" in exited["exit"]
    [restarted] = named(evs, "child_restarted", "crasher")
    assert restarted["reason"] == "permanent" and restarted["start"] == ["crasher"]
    assert restarted["terminate"] == []  # one_for_one: nobody else is touched
    # the LLM answer journaled before the crash is not asked for again
    rules = [c["rule"] for c in await mesh.fakellm_calls()]
    assert rules.count("crasher-calls") == 1 and rules.count("crasher-answers") == 1
    row = next(r for r in (await admin(mesh, "ps"))["result"] if r["agent"] == "crasher")
    assert row["restarts"] == 1 and row["generation"] == 2 and row["host"] == "host-a"


async def test_restart_intensity_escalates_to_the_parent_and_never_loops(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    conversation = await submit(mesh.nc, subjects.inbox("doomed"), "boom")
    reply = await await_reply(mesh.nc, conversation, timeout=60)
    # crash 1: inner restarts doomed; crash 2 within inner's period (intensity 1): inner
    # gives up and escalates; root restarts inner; the third crash of one message makes
    # it poison: dead-lettered and answered, so the loop ends
    assert "poison" in reply_text(reply)

    evs = await events(mesh)
    gave_up = named(evs, "supervisor_gave_up", "doomed")
    assert gave_up and gave_up[0]["supervisor"] == "inner" and gave_up[0]["intensity"] == 1
    assert named(evs, "escalated", "inner")[0]["parent"] == "root"
    root_restarts = [e for e in named(evs, "child_restarted", "inner") if e["supervisor"] == "root"]
    assert root_restarts and root_restarts[0]["exit"] == "shutdown"  # OTP: gave up -> shutdown
    order = [e["event"] for e in evs if e.get("child") in ("doomed", "inner")]
    assert order.index("supervisor_gave_up") < order.index("escalated")
    steady = next(r for r in (await admin(mesh, "ps"))["result"] if r["agent"] == "steady")
    assert steady["generation"] == 1  # one_for_one at the root: siblings untouched


async def test_host_killed_its_agents_are_rehomed_and_resume(start_mesh: MeshFactory) -> None:
    # host-b joins as a spare: with rebalancing it would take half of host-a's shards first
    mesh = await supervised_mesh(start_mesh, BEAMLINE_SUPERVISOR_REBALANCE_ON_JOIN="false")
    mesh.mesh.spawn(
        "agent-b",
        "services.agent",
        {"BEAMLINE_AGENT_HOST_ID": "host-b", "BEAMLINE_AGENT_LABELS": "tier=hot"},
    )

    await wait_for(lambda: _host_seen(mesh, "host-b"), timeout=20, what="host-b to join")
    conversation = await submit(mesh.nc, subjects.inbox("sleeper"), "nap")

    async def in_tool() -> bool:
        return "sleeper-calls" in [c["rule"] for c in await mesh.fakellm_calls()]

    await wait_for(in_tool, timeout=20, what="sleeper to be inside its slow tool")
    mesh.mesh.process("agent").kill()  # kill -9 host-a, mid-task
    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "sleeper: slept 2.0"

    evs = await events(mesh)
    [lost] = named(evs, "host_lost")
    assert lost["host"] == "host-a" and "sleeper" in lost["agents"]
    moved = {e["child"]: e for e in named(evs, "agent_rehomed")}
    assert moved["sleeper"]["to_host"] == "host-b" and moved["hot"]["to_host"] == "host-b"
    # resumed from the journal: the LLM call made on host-a is not made again
    rules = [c["rule"] for c in await mesh.fakellm_calls()]
    assert rules.count("sleeper-calls") == 1 and rules.count("sleeper-answers") == 1
    assert not named(evs, "child_restarted")  # a lost host is not a crash
    rows = {r["agent"]: r for r in (await admin(mesh, "ps"))["result"]}
    assert {rows[a]["host"] for a in ("steady", "hot", "loose", "sleeper")} == {"host-b"}


async def test_a_joining_host_takes_half_the_shards_and_their_agents_move_unharmed(
    start_mesh: MeshFactory,
) -> None:
    # an 8 s tool is no hang here
    mesh = await supervised_mesh(start_mesh, BEAMLINE_SUPERVISOR_HUNG_AFTER_S="60")
    conversation = await submit(mesh.nc, subjects.inbox("sleeper"), "a long nap")

    async def in_tool() -> bool:
        return "sleeper-naps-long" in [c["rule"] for c in await mesh.fakellm_calls()]

    await wait_for(in_tool, timeout=20, what="sleeper to be inside its 8 s tool")
    # sleeper (shard 31) is mid-tool on host-a when host-b joins and takes shards 16-31
    mesh.mesh.spawn(
        "agent-b",
        "services.agent",
        {"BEAMLINE_AGENT_HOST_ID": "host-b", "BEAMLINE_AGENT_LABELS": "tier=cold"},
    )
    reply = await await_reply(mesh.nc, conversation, timeout=40)
    assert reply_text(reply) == "sleeper: slept 8.0"

    evs = await events(mesh)
    [moved] = named(evs, "shards_rebalanced")
    assert moved["host"] == "host-b" and moved["given"] == {"host-a": list(range(16, 32))}
    rehomed = {e["child"]: e for e in named(evs, "agent_rehomed")}
    assert {"sleeper", "steady", "hanger", "doomed"} <= rehomed.keys()
    assert "crasher" not in rehomed and "hot" not in rehomed  # shard 15; pinned to tier=hot
    assert all(e["from_host"] == "host-a" and e["to_host"] == "host-b" for e in rehomed.values())
    assert not named(evs, "child_restarted")  # a move is not a restart
    # moved mid-task (its tool cut off at its shutdown, 0.5 s, and run again on host-b),
    # the LLM call made on host-a is not made again: the move resumes from the journal
    rules = [c["rule"] for c in await mesh.fakellm_calls()]
    assert rules.count("sleeper-naps-long") == 1 and rules.count("sleeper-answers") == 1
    rows = {r["agent"]: r for r in (await admin(mesh, "ps"))["result"]}
    assert rows["sleeper"]["host"] == "host-b" and rows["crasher"]["host"] == "host-a"
    assert rows["sleeper"]["restarts"] == 0
    after = await submit(mesh.nc, subjects.inbox("steady"), "still there?")
    assert reply_text(await await_reply(mesh.nc, after, timeout=30)) == "echo: still there?"


async def _host_seen(mesh: MeshHandle, host: str) -> bool:
    health = json.loads((await mesh.nc.request(subjects.health("supervisor"), b"", timeout=2)).data)
    return host in health["hosts"]


async def test_a_hung_agent_is_killed_and_restarted(start_mesh: MeshFactory) -> None:
    mesh = await supervised_mesh(start_mesh)
    conversation = await submit(mesh.nc, subjects.inbox("hanger"), "zzz")
    reply = await await_reply(mesh.nc, conversation, timeout=40)
    assert reply_text(reply) == "hanger: awake zzz"
    evs = await events(mesh)
    [exited] = named(evs, "child_exited", "hanger")
    assert exited["exit"].startswith("hung: no progress for")
    assert named(evs, "child_restarted", "hanger")


async def test_standby_takes_over_without_restarting_healthy_agents(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    standby = mesh.mesh.spawn(
        "supervisor-2", "services.supervisor", {"BEAMLINE_SUPERVISOR_INSTANCE_ID": "sup-2"}
    )
    assert (await admin(mesh, "kill", "steady"))["ok"]  # a restart the standby must know of
    before = {r["agent"]: r["generation"] for r in (await admin(mesh, "ps"))["result"]}
    mesh.mesh.process("supervisor").kill()  # kill -9 the leader

    async def sup2_leads() -> bool:
        try:
            health = await mesh.nc.request(subjects.health("supervisor"), b"", timeout=0.5)
        except Exception:
            return False
        body = json.loads(health.data)
        return bool(body["role"] == "leader" and body["instance"] == "sup-2")

    await wait_for(sup2_leads, timeout=10, what="the standby to lead")
    assert standby.alive()
    rows = (await admin(mesh, "ps"))["result"]
    after = {r["agent"]: r["generation"] for r in rows}
    assert after == before  # nothing healthy was restarted
    assert next(r for r in rows if r["agent"] == "steady")["restarts"] == 1  # from the record
    assert [e["instance"] for e in named(await events(mesh), "leader_elected")] == [
        "sup-1",
        "sup-2",
    ]

    # and the new leader supervises: a crash is restarted by sup-2
    conversation = await submit(mesh.nc, subjects.inbox("crasher"), "after-takeover")
    reply = await await_reply(mesh.nc, conversation, timeout=30)
    assert reply_text(reply) == "crasher: survived after-takeover"


async def test_operator_commands_and_their_errors(start_mesh: MeshFactory) -> None:
    mesh = await supervised_mesh(start_mesh)
    tree = (await admin(mesh, "tree"))["result"]
    assert tree["supervisor"] == "root" and tree["children"][0]["supervisor"] == "inner"
    assert tree["children"][1] | {"agent": "steady", "supervised": "running"} == tree["children"][1]

    killed = await admin(mesh, "kill", "steady")
    assert killed["ok"] and killed["result"]["generation"] == 2
    evs = await events(mesh)
    assert named(evs, "operator_command", "steady")[0]["requested_by"] == "test"
    assert named(evs, "child_exited", "steady")[0]["exit"] == "killed"

    restarted = await admin(mesh, "restart", "inner")
    assert restarted["ok"]
    inspected = (await admin(mesh, "inspect", "steady"))["result"]
    assert inspected["state"] == "idle" and inspected["host"] == "host-a"

    unknown = await admin(mesh, "kill", "nobody")
    assert not unknown["ok"] and unknown["reason"] == "unknown_recipient"
    assert "no agent or supervisor named 'nobody'" in unknown["error"]
    loose = await admin(mesh, "kill", "loose")
    assert not loose["ok"] and "not a supervised agent" in loose["error"]
    bad = await admin(mesh, "explode", "steady")
    assert not bad["ok"] and "unknown command" in bad["error"]


async def test_a_simple_one_for_one_pool_starts_restarts_and_removes_members(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    # a message to a member not started yet waits in its mailbox, as OTP's would not: here
    # mailboxes outlive their agents
    early = await submit(mesh.nc, subjects.inbox("worker-early"), "k-early")
    assert (await admin(mesh, "tree"))["result"]["children"][-1]["children"] == []

    numbered = await admin(mesh, "start_child", "pool", count=2)
    assert numbered["result"] == {"supervisor": "pool", "started": ["worker-1", "worker-2"], "n": 2}
    named_one = await admin(mesh, "start_child", "pool", suffixes=["early"])
    assert named_one["result"]["started"] == ["worker-early"]
    # it finishes the waiting task after one crash: simple_one_for_one restarts only it
    reply = await await_reply(mesh.nc, early, timeout=30)
    assert reply_text(reply) == "crasher: survived k-early"
    conversation = await submit(mesh.nc, subjects.inbox("worker-2"), "k2")
    assert reply_text(await await_reply(mesh.nc, conversation, timeout=30)).endswith("k2")

    evs = await events(mesh)
    restarted = named(evs, "child_restarted", "worker-early")
    assert (
        restarted
        and restarted[0]["supervisor"] == "pool"
        and restarted[0]["start"] == ["worker-early"]
    )
    assert named(evs, "child_started", "worker-1")[0]["supervisor"] == "pool"
    rows = {r["agent"]: r for r in (await admin(mesh, "ps"))["result"]}
    assert {"worker-1", "worker-2", "worker-early"} <= rows.keys() and "worker" not in rows
    assert rows["worker-early"]["supervisor"] == "pool" and rows["worker-early"]["restarts"] == 1

    gone = await admin(mesh, "terminate_child", "worker-1")
    assert gone["result"] == {"agent": "worker-1", "terminated": True}
    rows = {r["agent"]: r for r in (await admin(mesh, "ps"))["result"]}
    assert "worker-1" not in rows and "worker-2" in rows
    next_one = await admin(mesh, "start_child", "pool", count=1)
    assert next_one["result"]["started"] == ["worker-3"]  # numbered after the highest

    refusals: list[tuple[str, str, dict[str, Any], str]] = [
        ("terminate_child", "steady", {}, "not a member of a simple_one_for_one pool"),
        ("start_child", "root", {"count": 1}, "'root' is not a simple_one_for_one supervisor"),
        ("start_child", "pool", {}, "start_child takes suffixes or a count"),
        ("start_child", "pool", {"suffixes": ["a.b"]}, "must be 1-128 of"),
        ("start_child", "pool", {"count": 10_001}, "less than or equal to 10000"),
    ]
    for command, target, extra, error in refusals:
        refused = await admin(mesh, command, target, **extra)
        assert not refused["ok"] and error in refused["error"], refused


async def test_shutdown_timeout_then_brutal_kill(start_mesh: MeshFactory) -> None:
    mesh = await supervised_mesh(start_mesh)
    conversation = await submit(mesh.nc, subjects.inbox("sleeper"), "interrupted")

    async def in_tool() -> bool:
        return "sleeper-calls" in [c["rule"] for c in await mesh.fakellm_calls()]

    await wait_for(in_tool, timeout=20, what="sleeper to be inside its slow tool")
    await admin(mesh, "restart", "sleeper")  # shutdown 0.5 s < the 2 s tool: killed
    [stopped] = named(await events(mesh), "child_stopped", "sleeper")
    assert stopped["outcome"] == "killed"
    reply = await await_reply(mesh.nc, conversation, timeout=30)  # nothing lost
    assert reply_text(reply) == "sleeper: slept 2.0"


async def test_a_host_rejects_bad_control_commands_and_stays_up(start_mesh: MeshFactory) -> None:
    mesh = await supervised_mesh(start_mesh)
    # only the supervisor's NATS user may publish control commands
    nc = await mesh.connect_as(nats_auth.Role.SUPERVISOR, "test-as-supervisor")

    async def command(name: str, body: bytes) -> dict[str, Any]:
        reply = await nc.request(subjects.control("host-a", name), body, timeout=5)
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    not_json = await command("start", b"{nope")
    assert not not_json["ok"] and "not a valid StartAgents" in not_json["error"]
    unknown = await command("start", b'{"term": 99, "agents": ["nobody"], "generations": [1]}')
    assert not unknown["ok"] and "no agent named 'nobody'" in unknown["error"]
    stale = await command("stop", b'{"term": 1, "agents": ["steady"], "timeout_s": 1}')
    assert not stale["ok"] and "term 1" in stale["error"]  # the leader's term is higher now
    assert not (await command("explode", b"{}"))["ok"]
    oversized = await command("assign", b'{"term": 99, "shards": []' + b" " * 300_000 + b"}")
    assert not oversized["ok"]
    await nc.close()
    health = json.loads((await mesh.nc.request(subjects.health("agent"), b"", timeout=5)).data)
    assert health["ok"] and health["host"] == "host-a"


async def test_the_cli_shows_ps_and_the_tree_and_names_unknown_agents(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)

    beamline = mesh.cli

    code, ps = await beamline("ps")
    assert code == 0, ps
    header, *rows = ps.splitlines()
    assert header.split()[:4] == ["AGENT", "SUPERVISOR", "HOST", "STATE"]
    assert any(r.split()[:4] == ["steady", "root", "host-a", "idle"] for r in rows)
    code, tree = await beamline("tree")
    assert code == 0 and tree.splitlines()[0].startswith("root (one_for_one, 0/10 restarts")
    assert "─ hot [running] on host-a" in tree
    assert "└─ pool (simple_one_for_one, pool of worker x0" in tree
    code, out = await beamline("kill", "nobody")
    assert code == 2 and "no agent or supervisor named 'nobody'" in out
    code, out = await beamline("restart", "steady", "--json")
    assert code == 0 and json.loads(out)["generation"] == 2


async def test_the_supervisor_meets_bad_reports_and_requests_with_clear_errors(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    host = await mesh.connect_as(nats_auth.Role.AGENT, "test-as-host")
    try:
        await host.publish(subjects.heartbeat("host-z"), b"not a heartbeat")
        bad_exit = json.loads((await host.request(subjects.CHILD_EXIT, b"{nope", timeout=5)).data)
        assert not bad_exit["ok"] and "not a valid ChildExit" in bad_exit["error"]
        # an exit of an incarnation the supervisor already replaced changes nothing
        stale = b'{"host": "host-a", "agent": "steady", "generation": 0, "exit": "crash: old"}'
        assert json.loads((await host.request(subjects.CHILD_EXIT, stale, timeout=5)).data)["ok"]
    finally:
        await host.close()
    bad_admin = json.loads(
        (await mesh.nc.request(subjects.admin("kill"), b"[1, 2", timeout=5)).data
    )
    assert not bad_admin["ok"] and "not a valid AdminRequest" in bad_admin["error"]
    no_target = await admin(mesh, "inspect")
    assert not no_target["ok"] and "needs a target agent" in no_target["error"]

    health = json.loads((await mesh.nc.request(subjects.health("supervisor"), b"", timeout=5)).data)
    assert health["role"] == "leader" and health["hosts"] == ["host-a"]  # host-z never joined
    steady = next(r for r in (await admin(mesh, "ps"))["result"] if r["agent"] == "steady")
    assert steady["generation"] == 1 and steady["restarts"] == 0
    assert not named(await events(mesh), "child_exited")


async def test_the_tree_survives_a_nats_restart_and_supervises_after_it(
    start_mesh: MeshFactory,
) -> None:
    mesh = await supervised_mesh(start_mesh)
    mesh.mesh.process("nats-server").kill()  # kill -9: JetStream recovers from its store
    await mesh.mesh.respawn("nats-server")
    await wait_for(lambda: mesh.nc.is_connected, timeout=20, what="test client reconnected")

    attempts = iter(range(100))

    async def crash_restarted() -> bool:
        key = f"after-nats-{next(attempts)}"  # a fresh key crashes once more
        conversation = await submit(mesh.nc, subjects.inbox("crasher"), key)
        reply = await await_reply(mesh.nc, conversation, timeout=15)
        return reply_text(reply) == f"crasher: survived {key}"

    # NATS was gone for longer than a lease and than the heartbeat window: the leader lost
    # its lease and the host looked lost; once NATS is back, one leads again, the host
    # rejoins, and a crash is restarted as before
    assert await wait_for(crash_restarted, timeout=60, interval=0.5, what="a supervised reply")
    assert named(await events(mesh), "child_restarted", "crasher")
    health = json.loads((await mesh.nc.request(subjects.health("supervisor"), b"", timeout=5)).data)
    assert health["role"] == "leader" and health["hosts"] == ["host-a"]
    for name in ("supervisor", "agent", "gateway", "recorder"):
        assert mesh.mesh.process(name).alive(), mesh.logs(name)[-2000:]
