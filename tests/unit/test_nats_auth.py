"""The NATS permission model (beamline.nats_auth): who may publish and subscribe what, the
generated nats-server config, and the credentials of the embedded mesh. What the server
itself enforces is in tests/integration/test_nats_permissions.py."""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from beamline import nats_auth, nats_credentials, subjects
from beamline.bus import refused_delay
from beamline.errors import CallerError
from beamline.nats_auth import Role, User
from beamline.nats_credentials import Credentials, MeshCredentials
from beamline.process import nats_server_binary
from beamline.runtime import SERVICES
from beamline.settings import MeshSettings

ROOT = Path(__file__).resolve().parents[2]
AUTH_CONF = ROOT / "infra/nats/auth.conf"
USERS = nats_auth.default_users(clients=("alice", "bob"))
SOURCES = (Role.AGENT, Role.SUPERVISOR, Role.GATEWAY, Role.RECORDER, Role.LOOPGUARD)


def rights(role: Role) -> nats_auth.Rights:
    return next(u for u in USERS if u.role is role).rights()


def check_config(
    text: str, tmp_path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "auth.conf"
    conf.write_text(text)
    return subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), **env},
        check=False,
    )


# --- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_only_the_supervisor_publishes_control_commands(role: Role) -> None:
    assert rights(role).may_publish(subjects.control("host-1", "restart")) == (
        role is Role.SUPERVISOR
    )


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("source", SOURCES)
def test_a_service_publishes_only_its_own_events(role: Role, source: Role) -> None:
    assert rights(role).may_publish(subjects.event(source.value, "x")) == (role is source)


@pytest.mark.parametrize("role", list(Role))
def test_only_the_loop_guard_asks_the_supervisor_to_act_on_a_looping_agent(role: Role) -> None:
    assert rights(role).may_publish(subjects.GUARD) == (role is Role.LOOPGUARD)
    assert rights(role).may_subscribe(subjects.GUARD) == (role is Role.SUPERVISOR)
    assert rights(role).may_publish(subjects.escalation("writer")) == (role is Role.LOOPGUARD)


def test_the_loop_guard_reads_the_journal_only_through_its_consumer() -> None:
    guard = rights(Role.LOOPGUARD)
    consumer = subjects.CONSUMER_LOOPGUARD
    for subject in (
        f"$JS.API.CONSUMER.DURABLE.CREATE.BL_JOURNAL.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.BL_JOURNAL.{consumer}",
        f"$JS.ACK.BL_JOURNAL.{consumer}.1.2.3.4.5",
        "$JS.API.DIRECT.GET.BL_JOURNAL",  # replaying one conversation
        "$KV.BL_LOOPGUARD.state",
        subjects.event("loopguard", "loop_detected"),
    ):
        assert guard.may_publish(subject), subject
    for subject in (
        subjects.journal("writer", "c1"),  # it never writes an agent's journal
        subjects.control("host-1", "stop"),  # it asks the supervisor instead
        subjects.admin("restart"),
        "$KV.BL_SUPERVISOR.tree",
        "$JS.API.CONSUMER.DURABLE.CREATE.BL_JOURNAL.recorder",
    ):
        assert not guard.may_publish(subject), subject
    assert guard.may_subscribe(subjects.LOOPGUARD_ALL, queue=subjects.QUEUE_LOOPGUARD)
    assert not guard.may_subscribe(subjects.JOURNAL_ALL)


def test_a_human_with_a_client_user_reads_and_answers_escalations() -> None:
    alice = next(u for u in USERS if u.name == "alice").rights()
    assert alice.may_subscribe(subjects.escalation("writer"))
    assert alice.may_publish(subjects.LOOPGUARD_ANSWER)
    assert alice.may_publish(subjects.LOOPGUARD_LIST)
    assert not alice.may_publish(subjects.GUARD)


def test_an_agent_host_consumes_its_mailboxes_and_reports_to_the_supervisor() -> None:
    agent = rights(Role.AGENT)
    for subject in (
        subjects.journal("writer", "c1"),
        subjects.reply("c1"),
        subjects.inbox("writer"),
        subjects.llm("openai"),
        subjects.dlq("agent"),
        subjects.heartbeat("host-1"),
        subjects.CHILD_EXIT,
        "$JS.ACK.BL_MAILBOX.mbox-3.1.2.3.4.5",
        f"$JS.API.CONSUMER.DURABLE.CREATE.BL_MAILBOX.{subjects.mailbox_consumer(3)}",
        f"$JS.API.CONSUMER.INFO.BL_TASKS.{subjects.CONSUMER_DISPATCH}",
        "$KV.BL_ATTEMPTS.mbox.7",
        "_INBOX.alice.reply",  # a task's reply_to
    ):
        assert agent.may_publish(subject), subject
    for deliver in (
        subjects.DELIVER_DISPATCH,
        subjects.mailbox_deliver("host-1", 3),
        subjects.pinned_deliver("host-1", "writer"),
    ):
        assert agent.may_subscribe(deliver, queue=subjects.CONSUMER_DISPATCH), deliver
    assert agent.may_subscribe(subjects.control_all("host-1"))
    assert agent.may_subscribe(subjects.health("agent"), queue="agent")


def test_an_agent_host_holds_no_other_roles_rights() -> None:
    agent = rights(Role.AGENT)
    for subject in (
        subjects.CONTROL_ALL,
        subjects.admin("kill"),
        subjects.QUERY,
        "$KV.BL_SUPERVISOR.leader",
        "$KV.BL_LLM_RESULTS.x",
        "$JS.API.STREAM.DELETE.BL_MAILBOX",
        "$JS.API.STREAM.PURGE.BL_JOURNAL",
        "$JS.ACK.BL_TASKS.recorder.1.2.3.4.5",
        "_INBOX_agent.x",  # not an inbox subject: reply_to may not point anywhere
    ):
        assert not agent.may_publish(subject), subject
    assert not agent.may_subscribe(subjects.LLM_ALL, queue=subjects.QUEUE_GATEWAY)
    assert not agent.may_subscribe(subjects.REPLIES_ALL)


def test_a_client_publishes_tasks_and_reads_only_its_own_inbox() -> None:
    alice = next(u for u in USERS if u.name == "alice").rights()
    assert alice.may_publish(subjects.task("research"))
    assert alice.may_publish(subjects.inbox("writer"))
    assert alice.may_subscribe("_INBOX.alice.>")
    for subject in (subjects.REPLIES_ALL, subjects.EVENTS_ALL, "_INBOX.bob.x", "_INBOX.>"):
        assert not alice.may_subscribe(subject), subject
    for subject in (
        subjects.QUERY,
        subjects.llm("x"),
        subjects.admin("ps"),
        "$JS.API.STREAM.NAMES",
    ):
        assert not alice.may_publish(subject), subject


def test_nobody_subscribes_to_another_users_inbox() -> None:
    for user in USERS:
        for other in USERS:
            inbox = f"{nats_auth.inbox_prefix(other.name)}.x"
            assert user.rights().may_subscribe(inbox) == (user is other), (user.name, other.name)


def test_no_role_may_delete_or_purge_a_stream_or_reach_the_whole_api() -> None:
    for user in USERS:
        for subject in user.rights().publish:
            assert subject not in (">", "$JS.>", "$JS.API.>", "$KV.>"), (user.name, subject)
            assert ".DELETE." not in subject or ".CONSUMER.DELETE." in subject, subject
            assert ".PURGE." not in subject, subject


@pytest.mark.parametrize("role", list(Role))
def test_only_init_and_admin_may_declare_the_layout(role: Role) -> None:
    declares = [s for s in nats_auth.LAYOUT if ".INFO." not in s]  # CREATE and UPDATE
    assert declares
    for subject in declares:
        assert rights(role).may_publish(subject) == (role in (Role.INIT, Role.ADMIN)), subject


@pytest.mark.parametrize("role", list(nats_auth.USES))
def test_a_service_may_look_up_exactly_the_streams_and_buckets_it_checks_at_start(
    role: Role,
) -> None:
    lookups = {s for s in rights(role).publish if s.startswith("$JS.API.STREAM.INFO.")}
    assert lookups == set(nats_auth.USES[role].lookups())


def test_every_service_says_which_streams_and_buckets_it_uses() -> None:
    assert set(nats_auth.USES) == set(nats_auth.SERVICE_ROLES.values())
    layout = {*subjects.RECORDED_STREAMS}
    for uses in nats_auth.USES.values():
        assert set(uses.streams) <= layout and set(uses.buckets) <= set(nats_auth.BUCKETS)


def test_services_answer_requests_into_inboxes_only() -> None:
    answerers = {r for r in Role if nats_auth.RIGHTS[r].may_publish("_INBOX.admin.x.y")}
    assert answerers == {
        Role.AGENT,
        Role.SUPERVISOR,
        Role.GATEWAY,
        Role.RECORDER,
        Role.BUDGET,
        Role.LOOPGUARD,
    }
    # an answer on a reply subject a requester names elsewhere is refused (no allow_responses)
    assert "allow_responses" not in nats_auth.render(USERS)
    assert not rights(Role.GATEWAY).may_publish(subjects.control("host-1", "restart"))
    assert rights(Role.GATEWAY).may_subscribe(subjects.LLM_ALL, queue=subjects.QUEUE_GATEWAY)
    assert not rights(Role.GATEWAY).may_subscribe(subjects.LLM_ALL)  # no eavesdropping
    assert rights(Role.RECORDER).may_subscribe(subjects.QUERY, queue=subjects.QUEUE_RECORDER)
    assert rights(Role.SUPERVISOR).may_subscribe(subjects.ADMIN_ALL)


def test_every_embedded_service_runs_as_a_role() -> None:
    assert set(SERVICES) <= set(nats_auth.SERVICE_ROLES)
    mesh = MeshCredentials.generate("nats://127.0.0.1:1", USERS)
    env = nats_credentials.service_env("gateway", mesh)
    assert env == {
        "BEAMLINE_NATS_USER": "gateway",
        "BEAMLINE_NATS_PASSWORD": mesh.passwords["gateway"].get_secret_value(),
    }
    assert nats_credentials.service_env("fakellm", mesh) == {}  # HTTP only, no NATS user


def test_a_user_name_must_be_a_subject_token() -> None:
    with pytest.raises((ValidationError, CallerError)):
        User(name="a.b", role=Role.CLIENT)


# --- the generated config ----------------------------------------------------------------


def test_the_checked_in_container_config_is_what_the_model_generates() -> None:
    assert AUTH_CONF.read_text() == nats_auth.render(nats_auth.default_users()), (
        "infra/nats/auth.conf is stale: run `.venv/bin/python infra/nats/generate.py`"
    )


def test_nats_server_accepts_the_generated_config_with_passwords_from_the_environment(
    tmp_path: Path,
) -> None:
    env = {u.password_env: "pw" for u in USERS}
    done = check_config(nats_auth.render(USERS), tmp_path, env)
    assert done.returncode == 0, done.stderr


def test_a_missing_password_variable_stops_nats_server_naming_it(tmp_path: Path) -> None:
    env = {u.password_env: "pw" for u in USERS if u.role is not Role.AGENT}
    done = check_config(nats_auth.render(USERS), tmp_path, env)
    assert done.returncode != 0
    assert "NATS_AGENT_PASSWORD" in done.stderr + done.stdout


def test_the_embedded_config_carries_generated_passwords(tmp_path: Path) -> None:
    mesh = MeshCredentials.generate("nats://127.0.0.1:1", USERS)
    text = nats_auth.render(USERS, mesh.passwords)
    assert "$NATS_" not in text
    assert check_config(text, tmp_path, {}).returncode == 0
    assert len({p.get_secret_value() for p in mesh.passwords.values()}) == len(USERS)


# --- credentials -------------------------------------------------------------------------


def test_the_credentials_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / nats_auth.CREDENTIALS_FILE
    path.write_text("{}")
    path.chmod(0o644)  # an older, wider copy is narrowed
    mesh = MeshCredentials.generate("nats://127.0.0.1:4222", USERS)
    mesh.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = MeshCredentials.load(path)
    assert loaded is not None and loaded.url == mesh.url
    assert (
        loaded.passwords["admin"].get_secret_value() == mesh.passwords["admin"].get_secret_value()
    )
    assert MeshCredentials.load(tmp_path / "missing.json") is None


def test_the_cli_uses_the_embedded_operator_only_for_that_meshs_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BEAMLINE_NATS_USER", raising=False)
    mesh = MeshCredentials.generate("nats://127.0.0.1:4222", USERS)
    mesh.save(tmp_path / nats_auth.CREDENTIALS_FILE)

    def admin(url: str, **kw: Any) -> Credentials | None:
        return nats_credentials.embedded_admin(MeshSettings(nats_url=url, data_dir=tmp_path, **kw))

    found = admin("nats://127.0.0.1:4222")
    assert found is not None and found.user == "admin"
    assert admin("nats://127.0.0.1:5222") is None  # another server: not this mesh's file
    assert admin("nats://someone:pw@127.0.0.1:4222") is None  # the URL names a user
    assert admin("nats://127.0.0.1:4222", nats_user="client") is None


def test_credentials_come_from_the_argument_then_the_url_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BEAMLINE_NATS_USER", "gateway")
    monkeypatch.setenv("BEAMLINE_NATS_PASSWORD", "from-env")
    url = "nats://admin:from-url@127.0.0.1:4222,nats://127.0.0.1:4223"
    servers, who = nats_credentials.resolve(url)
    assert servers == ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]  # no password left
    assert who is not None and (who.user, who.password.get_secret_value()) == ("admin", "from-url")
    _, who = nats_credentials.resolve("nats://127.0.0.1:4222")
    assert who is not None and who.user == "gateway"
    given = Credentials(user="client", password=SecretStr("given"))
    assert nats_credentials.resolve(url, given)[1] == given


def test_a_url_with_credentials_round_trips_without_them() -> None:
    who = Credentials(user="admin", password=SecretStr("s3cret"))
    url = nats_credentials.with_credentials("nats://127.0.0.1:4222", who)
    assert url == "nats://admin:s3cret@127.0.0.1:4222"
    assert nats_credentials.without_credentials(url) == "nats://127.0.0.1:4222"


def test_a_refused_login_backs_off_exponentially_to_a_cap() -> None:
    delays = [refused_delay(n) for n in range(1, 12)]
    assert delays[0] <= 0.5
    assert all(a <= b for a, b in itertools.pairwise(delays[:6]))  # below the cap
    assert max(delays) <= 30.0 and delays[-1] >= 15.0
