"""Who may do what on NATS: one user per role, each with publish and subscribe allow lists
derived from `beamline.subjects`, rendered as a nats-server `authorization` block.

    agent       agent hosts: consume mailboxes and role tasks, journal, ask the gateway,
                reply, dead-letter, heartbeat; obey `bl.ctl.<host>.*` but never send it
    supervisor  sends the control commands, records its decisions, answers operators
    gateway     answers `bl.llm.*`, keeps its idempotency bucket, reports breaker events
                and writes each breaker's state into `BL_BREAKERS` (agent hosts watch it)
    recorder    pulls every recorded stream, acks, answers `bl.query.sql`
    budget      answers reservations, settles them from the gateway's call events, keeps
                its ledger bucket, asks the supervisor to stop an exhausted subtree
    loopguard   reads the journal through its durable consumer, keeps its bucket, asks the
                supervisor to restart, suspend, resume or stop a looping agent (only it may
                publish `bl.sup.guard`), publishes escalations for humans
    client      publishes tasks and inbox messages; reads only its own inbox; may read and
                answer the loop guard's escalations (a human's job)
    admin       the operator (CLI): a client, plus `bl.admin.*`, queries, health, reading
                the recorded streams, and declaring the layout (`beamline up`)
    init        declares the layout: streams and key-value buckets

Inboxes. A user U gets the inbox prefix `_INBOX.U` (`bus.connect` sets it) and subscribes
only below it, so nobody reads another's replies: request answers, JetStream acks and API
answers, and ordered-consumer deliveries all land there. A service that answers requests may
publish under `_INBOX.>` (`INBOXES`), and so may an agent, for a task's `reply_to`; outside
their lists, nowhere. So neither a crafted reply subject nor a task's `reply_to` can make a
service publish a control command or another service's event. nats-server's
`allow_responses` is not used because it would: it lets a service answer on whatever reply
subject a request names. (Writing into an inbox does not let one read it, and an inbox
subject carries a random token nobody else sees.)

JetStream. Each role gets the API subjects of its own streams and consumers only:
`$JS.API.CONSUMER.<verb>.<stream>.<consumer>`, `$JS.ACK.<stream>.<consumer>.>`, and so on.
Declaring the layout (stream INFO/CREATE/UPDATE on the Beamline streams and buckets, never
DELETE or PURGE) belongs to `init` (the job `beamline init`, compose's `init`) and `admin`
(`beamline up` declares it before it starts the embedded services). A service may not create
or update a stream or bucket, so a compromised one cannot re-declare a stream's limits: at
start it only checks that what it uses exists (`streams.require_layout`), which takes
`$JS.API.STREAM.INFO.<stream>` on exactly those (`USES`), and exits naming what is missing.

Passwords: `$NATS_<USER>_PASSWORD` in the container config (nats-server reads the
environment), random literals in the embedded runtime's config, whose copy for clients is a
0600 file in the data directory (`CREDENTIALS_FILE`, `beamline.nats_credentials`).

`infra/nats/generate.py` writes `infra/nats/auth.conf` (the container config's users) from
this model; a unit test fails when the checked-in file and the model differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Final

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

from beamline import subjects


class Role(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    GATEWAY = "gateway"
    RECORDER = "recorder"
    BUDGET = "budget"
    LOOPGUARD = "loopguard"
    CLIENT = "client"
    ADMIN = "admin"
    INIT = "init"


# the embedded runtime's service names (runtime.SERVICES) -> the role each runs as
SERVICE_ROLES: Final[Mapping[str, Role]] = {
    "agent": Role.AGENT,
    "supervisor": Role.SUPERVISOR,
    "gateway": Role.GATEWAY,
    "recorder": Role.RECORDER,
    "budget": Role.BUDGET,
    "loopguard": Role.LOOPGUARD,
}
CREDENTIALS_FILE: Final = "nats-credentials.json"
INBOX_ROOT: Final = "_INBOX"  # NATS's own inbox namespace; every user gets a branch of it
INBOXES: Final = f"{INBOX_ROOT}.>"  # where answers go, and a task's reply_to copy


# --- subjects ------------------------------------------------------------------------

# Placeholder tokens that subjects.token accepts, so every pattern below is built by the
# function that builds the concrete subject (never retyped) and then turned into a wildcard.
_ONE, _REST = "PLACEHOLDER-ONE", "PLACEHOLDER-REST"


def _wild(subject: str) -> str:
    return subject.replace(_ONE, "*").replace(_REST, ">")


def _below(subject: str) -> str:
    """Every subject beside `subject` and below: `a.b.c` -> `a.b.>`."""
    return subject.rsplit(".", 1)[0] + ".>"


def _queue(subject: str, group: str) -> str:
    """A subscribe permission for one queue group only (nats-server's "<subject> <queue>")."""
    return f"{subject} {group}"


def _events(source: Role) -> str:
    return _wild(subjects.event(source.value, _REST))


def _health(service: str) -> str:
    # answer_health subscribes with the service name as its queue group
    return _queue(subjects.health(service), service)


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"  # nats-py's (and every NATS client's) bucket stream name


def _api(*tokens: str) -> str:
    return ".".join(("$JS", "API", *tokens))


def _declare(streams: Iterable[str]) -> tuple[str, ...]:
    return tuple(_api("STREAM", verb, s) for s in streams for verb in ("INFO", "CREATE", "UPDATE"))


def _durable(stream: str, consumer: str) -> tuple[str, ...]:
    """Create (both API forms), inspect, re-create and acknowledge a durable consumer."""
    return (
        _api("CONSUMER", "CREATE", stream, consumer),
        _api("CONSUMER", "CREATE", stream, consumer, ">"),
        _api("CONSUMER", "DURABLE", "CREATE", stream, consumer),
        _api("CONSUMER", "INFO", stream, consumer),
        _api("CONSUMER", "DELETE", stream, consumer),
        f"$JS.ACK.{stream}.{consumer}.>",
    )


def _pull(stream: str, consumer: str) -> str:
    return _api("CONSUMER", "MSG", "NEXT", stream, consumer)


def _read(stream: str) -> tuple[str, ...]:
    """Read a stream: ephemeral (ordered) consumers, direct gets, listing consumers."""
    return (
        _api("STREAM", "INFO", stream),
        _api("STREAM", "MSG", "GET", stream),
        _api("DIRECT", "GET", stream),
        _api("DIRECT", "GET", stream, ">"),
        _api("CONSUMER", "CREATE", stream),
        _api("CONSUMER", "CREATE", stream, ">"),
        _api("CONSUMER", "INFO", stream, "*"),
        _api("CONSUMER", "LIST", stream),
        _api("CONSUMER", "NAMES", stream),
        f"$JS.FC.{stream}.>",  # ordered consumers answer flow control
    )


def _bucket(bucket: str) -> tuple[str, ...]:
    """Get and put keys of one key-value bucket."""
    stream = kv_stream(bucket)
    return (
        f"$KV.{bucket}.>",
        _api("STREAM", "INFO", stream),
        _api("STREAM", "MSG", "GET", stream),
        _api("DIRECT", "GET", stream, ">"),
    )


BUCKETS: Final = (
    subjects.BUCKET_LLM_RESULTS,
    subjects.BUCKET_ATTEMPTS,
    subjects.BUCKET_SUPERVISOR,
    subjects.BUCKET_BUDGET,
    subjects.BUCKET_BREAKERS,
    subjects.BUCKET_LOOPGUARD,
)
# what only `init` and `admin` may do: declare every stream and bucket
LAYOUT: Final = _declare((*subjects.RECORDED_STREAMS, *(kv_stream(b) for b in BUCKETS)))


class Uses(BaseModel):
    """The streams and buckets one service works with. It checks at start that each exists
    (`streams.require_layout`), for which it may look each up (STREAM.INFO), and no more."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    streams: tuple[str, ...] = ()
    buckets: tuple[str, ...] = ()

    def lookups(self) -> tuple[str, ...]:
        names = (*self.streams, *(kv_stream(b) for b in self.buckets))
        return tuple(_api("STREAM", "INFO", name) for name in names)


USES: Final[Mapping[Role, Uses]] = {
    Role.AGENT: Uses(
        streams=(
            subjects.STREAM_TASKS,  # role dispatch consumes it
            subjects.STREAM_MAILBOX,  # the shard and pinned-agent consumers
            subjects.STREAM_JOURNAL,  # written and read back
            subjects.STREAM_REPLIES,
            subjects.STREAM_EVENTS,
            subjects.STREAM_DLQ,
        ),
        buckets=(subjects.BUCKET_ATTEMPTS, subjects.BUCKET_BREAKERS),
    ),
    Role.SUPERVISOR: Uses(streams=(subjects.STREAM_EVENTS,), buckets=(subjects.BUCKET_SUPERVISOR,)),
    Role.GATEWAY: Uses(
        streams=(subjects.STREAM_EVENTS, subjects.STREAM_DLQ),
        buckets=(subjects.BUCKET_LLM_RESULTS, subjects.BUCKET_BREAKERS),
    ),
    Role.RECORDER: Uses(streams=subjects.RECORDED_STREAMS),
    Role.BUDGET: Uses(streams=(subjects.STREAM_EVENTS,), buckets=(subjects.BUCKET_BUDGET,)),
    Role.LOOPGUARD: Uses(
        streams=(
            subjects.STREAM_JOURNAL,  # its consumer; replays a conversation; the fence's seq
            subjects.STREAM_EVENTS,
            subjects.STREAM_ESCALATIONS,
        ),
        buckets=(subjects.BUCKET_LOOPGUARD,),
    ),
}


# --- the model -----------------------------------------------------------------------


class Rights(BaseModel):
    """What one role may do. `subscribe` entries may name a queue group ("subject queue")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    what: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...] = ()

    def may_publish(self, subject: str) -> bool:
        """What nats-server decides for this allow list."""
        return any(_covers(pattern, subject) for pattern in self.publish)

    def may_subscribe(self, subject: str, queue: str | None = None) -> bool:
        """A plain entry allows any queue group; "subject queue" allows that group only."""
        for entry in self.subscribe:
            pattern, _, group = entry.partition(" ")
            if _covers(pattern, subject) and (not group or group == queue):
                return True
        return False


def _covers(pattern: str, subject: str) -> bool:
    """Whether every subject `subject` matches (it may hold wildcards) also matches `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or have[i] == ">" or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


_CLIENT_PUBLISH: Final = (
    subjects.TASKS_ALL,
    subjects.INBOX_ALL,
    # a human answers the loop guard's escalations (and lists them) with any NATS client
    subjects.LOOPGUARD_LIST,
    subjects.LOOPGUARD_ANSWER,
)

RIGHTS: Final[Mapping[Role, Rights]] = {
    Role.AGENT: Rights(
        what="agent hosts: mailboxes in, journal, LLM requests, replies, heartbeats out",
        publish=(
            subjects.JOURNAL_ALL,
            subjects.REPLIES_ALL,
            subjects.INBOX_ALL,  # role dispatch re-publishes a task into an agent's mailbox
            subjects.LLM_ALL,
            subjects.dlq("agent"),
            subjects.dlq("task"),
            _events(Role.AGENT),
            subjects.HEARTBEATS_ALL,
            subjects.CHILD_EXIT,
            INBOXES,  # answers to the supervisor and health checks; a task's reply_to
            subjects.health("agent"),  # its container healthcheck asks itself
            *_durable(subjects.STREAM_TASKS, subjects.CONSUMER_DISPATCH),
            *_durable(subjects.STREAM_MAILBOX, "*"),  # shard and pinned-agent consumers
            _api("DIRECT", "GET", subjects.STREAM_JOURNAL),  # rebuilding state from a journal
            *_bucket(subjects.BUCKET_ATTEMPTS),
            # watches the breaker states (an ordered consumer on the bucket's stream); it
            # never writes them
            *_read(kv_stream(subjects.BUCKET_BREAKERS)),
            *USES[Role.AGENT].lookups(),
        ),
        subscribe=(
            _below(subjects.DELIVER_DISPATCH),  # every push consumer of the host delivers here
            _wild(subjects.control(_ONE, _REST)),
            _health("agent"),
        ),
    ),
    Role.SUPERVISOR: Rights(
        what="supervisors: control commands and decisions out, heartbeats and exits in",
        publish=(
            INBOXES,  # answers to operators and to hosts' exit reports
            subjects.CONTROL_ALL,
            _events(Role.SUPERVISOR),
            subjects.health("supervisor"),  # its container healthcheck asks itself
            *_bucket(subjects.BUCKET_SUPERVISOR),  # the leader's lease and the tree's state
            *USES[Role.SUPERVISOR].lookups(),
        ),
        subscribe=(
            subjects.HEARTBEATS_ALL,
            subjects.CHILD_EXIT,
            subjects.ADMIN_ALL,
            subjects.SUBTREE_EXHAUSTED,
            subjects.GUARD,
            _health("supervisor"),
        ),
    ),
    Role.GATEWAY: Rights(
        what="the LLM gateway: answers bl.llm.*, remembers answers, reports its breakers",
        publish=(
            INBOXES,  # the LLM answers
            _events(Role.GATEWAY),
            subjects.health("gateway"),  # its container healthcheck asks itself
            subjects.dlq("gateway"),
            subjects.BUDGET_RESERVE,  # a reservation before each provider call; nothing else
            *_bucket(subjects.BUCKET_LLM_RESULTS),
            *_bucket(subjects.BUCKET_BREAKERS),  # publishes its breakers' states
            *USES[Role.GATEWAY].lookups(),
        ),
        subscribe=(_queue(subjects.LLM_ALL, subjects.QUEUE_GATEWAY), _health("gateway")),
    ),
    Role.RECORDER: Rights(
        what="the recorder: pulls and acks every recorded stream, answers bl.query.sql",
        publish=(
            INBOXES,  # query answers
            _events(Role.RECORDER),
            subjects.health("recorder"),  # its container healthcheck asks itself
            *(
                subject
                for stream in subjects.RECORDED_STREAMS
                for subject in (
                    *_durable(stream, subjects.CONSUMER_RECORDER),
                    _pull(stream, subjects.CONSUMER_RECORDER),
                )
            ),
            *USES[Role.RECORDER].lookups(),
        ),
        subscribe=(_queue(subjects.QUERY, subjects.QUEUE_RECORDER), _health("recorder")),
    ),
    Role.BUDGET: Rights(
        what="the budget service: answers reservations, settles them from call events",
        publish=(
            INBOXES,  # answers to reservations and operators
            _events(Role.BUDGET),
            subjects.health("budget"),  # its container healthcheck asks itself
            subjects.SUBTREE_EXHAUSTED,  # a request: the supervisor stops the subtree
            *_durable(subjects.STREAM_EVENTS, subjects.CONSUMER_BUDGET),
            _pull(subjects.STREAM_EVENTS, subjects.CONSUMER_BUDGET),
            *_bucket(subjects.BUCKET_BUDGET),
            *USES[Role.BUDGET].lookups(),
        ),
        subscribe=(_queue(subjects.BUDGET_ALL, subjects.QUEUE_BUDGET), _health("budget")),
    ),
    Role.LOOPGUARD: Rights(
        what="the loop guard: watches the journal, acts through the supervisor, escalates",
        publish=(
            INBOXES,  # answers to operators
            _events(Role.LOOPGUARD),
            subjects.health("loopguard"),  # its container healthcheck asks itself
            subjects.GUARD,  # a request: the supervisor restarts, suspends, resumes, stops
            _wild(subjects.escalation(_ONE)),
            *_durable(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD),
            _pull(subjects.STREAM_JOURNAL, subjects.CONSUMER_LOOPGUARD),
            _api("DIRECT", "GET", subjects.STREAM_JOURNAL),  # replaying a conversation
            *_bucket(subjects.BUCKET_LOOPGUARD),
            *USES[Role.LOOPGUARD].lookups(),
        ),
        subscribe=(
            _queue(subjects.LOOPGUARD_ALL, subjects.QUEUE_LOOPGUARD),
            _health("loopguard"),
        ),
    ),
    Role.CLIENT: Rights(
        what="clients: publish tasks and inbox messages, read only their own inbox",
        publish=_CLIENT_PUBLISH,
        subscribe=(subjects.ESCALATIONS_ALL,),
    ),
    Role.ADMIN: Rights(
        what="the operator: a client, plus bl.admin.*, queries, health, reading streams",
        publish=(
            *_CLIENT_PUBLISH,
            subjects.ADMIN_ALL,
            subjects.BUDGET_RAISE,
            subjects.BUDGET_SHOW,
            subjects.QUERY,
            _wild(subjects.health(_ONE)),
            _api("STREAM", "NAMES"),  # which stream holds a subject (ordered consumers)
            _api("STREAM", "LIST"),
            *(s for stream in subjects.RECORDED_STREAMS for s in _read(stream)),
            *LAYOUT,  # `beamline up` declares the layout with the operator's credentials
        ),
        subscribe=(subjects.REPLIES_ALL, subjects.EVENTS_ALL, subjects.ESCALATIONS_ALL),
    ),
    Role.INIT: Rights(what="the init job: declares the streams and buckets", publish=LAYOUT),
}


class User(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    role: Role

    @field_validator("name")
    @classmethod
    def _token(cls, value: str) -> str:
        return subjects.token(value, "NATS user")  # it is also a token of the inbox prefix

    @property
    def password_env(self) -> str:
        return password_env(self.name)

    def rights(self) -> Rights:
        """The role's rights plus this user's own inbox."""
        rights = RIGHTS[self.role]
        subscribe = (*rights.subscribe, f"{inbox_prefix(self.name)}.>")
        return rights.model_copy(
            update={"publish": _unique(rights.publish), "subscribe": _unique(subscribe)}
        )


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def inbox_prefix(user: str) -> str:
    return f"{INBOX_ROOT}.{user}"


def password_env(user: str) -> str:
    return f"NATS_{user.upper().replace('-', '_')}_PASSWORD"


def default_users(clients: Iterable[str] = (Role.CLIENT.value,)) -> tuple[User, ...]:
    """One user per role, named after it; `clients` names the client users."""
    service_users = (User(name=r.value, role=r) for r in Role if r is not Role.CLIENT)
    return (*service_users, *(User(name=c, role=Role.CLIENT) for c in clients))


# --- rendering -----------------------------------------------------------------------

_HEADER = """\
# NATS users, one per Beamline role, with publish/subscribe allow lists.
# Generated from shared/beamline/nats_auth.py by infra/nats/generate.py: do not edit by hand
# (tests/unit/test_nats_auth.py fails when this file and the model differ).
# Passwords come from the environment, NATS_<USER>_PASSWORD (`beamline up` writes random
# literals into its own 0600 copy). nats-server parses such a value as a config token: start
# it with a letter and use letters, digits and _ only (a leading digit or - reads as a
# number, and # starts a comment that cuts the password short).
"""


def _strings(items: Iterable[str], indent: str) -> str:
    return "\n".join(f"{indent}{json.dumps(item)}" for item in items)


def _render_user(user: User, password: str | None) -> str:
    rights = user.rights()
    secret = json.dumps(password) if password is not None else f"${user.password_env}"
    lines = [
        f"    # {user.name}: {rights.what}",
        "    {",
        f"      user: {json.dumps(user.name)}",
        f"      password: {secret}",
        "      permissions {",
        "        publish { allow: [",
        _strings(rights.publish, "          "),
        "        ] }",
        "        subscribe { allow: [",
        _strings(rights.subscribe, "          "),
        "        ] }",
        "      }",
        "    }",
    ]
    return "\n".join(lines)


def render(users: Iterable[User], passwords: Mapping[str, SecretStr] | None = None) -> str:
    """The `authorization` block: passwords as `$NATS_<USER>_PASSWORD` references, or the
    given literals (the embedded runtime's config file, which is 0600)."""
    body = "\n".join(
        _render_user(u, passwords[u.name].get_secret_value() if passwords else None) for u in users
    )
    return f"{_HEADER}authorization {{\n  users = [\n{body}\n  ]\n}}\n"
