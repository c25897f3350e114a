"""The operator commands' one request path (`beamline.operator`) on a real nats-server: a
result, a refusal with the service's reason, nobody answering named with what to check;
and their table."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from beamline import operator
from beamline.budget import BudgetReply, ShowRequest
from beamline.errors import CallerError, Reason, TransientError

BUDGET = operator.Service(
    "budget service", "is services/budget running?", BudgetReply, Reason.BUDGET_UNAVAILABLE, 2
)


async def ask(nc: NATS) -> object:
    return await BUDGET.ask(nc, "test.ask", ShowRequest())


async def test_nobody_answering_names_who_and_what_to_check(nc: NATS) -> None:
    with pytest.raises(TransientError) as caught:
        await ask(nc)
    assert str(caught.value) == ("no budget service answered test.ask: is services/budget running?")
    assert caught.value.reason is Reason.BUDGET_UNAVAILABLE


async def test_a_result_or_a_refusal_with_the_services_reason(nc: NATS) -> None:
    replies = [
        BudgetReply(result={"accounts": []}),
        BudgetReply(ok=False, reason="unknown_recipient", error="no agent named 'x'"),
    ]

    async def answer(msg: Msg) -> None:
        await msg.respond(replies.pop(0).model_dump_json().encode())

    await nc.subscribe("test.ask", cb=answer)
    assert await ask(nc) == {"accounts": []}
    with pytest.raises(CallerError) as caught:
        await ask(nc)
    assert str(caught.value) == "no agent named 'x'"
    assert caught.value.reason is Reason.UNKNOWN_RECIPIENT


def test_the_table_aligns_columns_and_trims_trailing_space() -> None:
    assert operator.table([("A", "LONG HEADER", "C"), ("value", "x", "")]) == [
        "A      LONG HEADER  C",
        "value  x",
    ]
