"""`beamline logs` as a real subprocess against a whole mesh: filters, the text view, and
hostile filter values that must match nothing and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from beamline import client, query, reads, subjects
from beamline.testing import wait_for

from .conftest import ROOT, MeshFactory, MeshHandle

HOSTILE = [
    "' OR 1=1 --",
    "'); DROP TABLE bl_messages; --",
    "analyst' OR sender != '",
    "{agent:String}",
    "аналитик 🤖 ‮",
]


async def beamline(mesh: MeshHandle, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "beamline"),
        *args,
        env={**os.environ, **mesh.mesh.env()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def count_messages(mesh: MeshHandle) -> int:
    result = await query.query(mesh.nc, "SELECT count() FROM bl_messages FINAL")
    return int(result.rows[0][0])


async def test_logs_filters_by_agent_kind_and_time_and_hostile_values_match_nothing(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()
    conversations = []
    for question in ("What does 1000 in / 500 out cost?", "What does it cost?"):
        conversation = await client.submit(mesh.nc, subjects.task("analysis"), question)
        reply = await client.await_reply(mesh.nc, conversation, timeout=30)
        assert reply.kind.value == "reply", reply
        conversations.append(conversation)

    async def replies_recorded() -> bool:
        for conversation in conversations:
            rows = (await query.query(mesh.nc, reads.TRACE_SQL, {"id": conversation})).dicts()
            if not any(r["kind"] == "reply" for r in rows):
                return False
        return True

    await wait_for(replies_recorded, timeout=20, what="both replies recorded")

    code, out, err = await beamline(mesh, "logs", "--agent", "analyst", "--kind", "reply", "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    assert sorted(r["conversation_id"] for r in rows) == sorted(conversations)
    assert all(r["kind"] == "reply" and r["sender"] == "analyst" for r in rows), rows
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)  # newest last

    code, out, err = await beamline(mesh, "logs", "--since", "10m")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) >= 8, out  # task, llm responses, tool results, replies, events
    assert all(" -> " in line for line in lines)
    assert [line[:23] for line in lines] == sorted(line[:23] for line in lines)
    assert any("task: What does it cost?" in line for line in lines)
    assert any("analyst -> " in line and "reply: That call costs" in line for line in lines)

    code, out, err = await beamline(
        mesh, "logs", "--conversation", conversations[0], "--limit", "2", "--json"
    )
    assert code == 0, err
    last_two = json.loads(out)
    assert len(last_two) == 2 and last_two[-1]["kind"] == "reply"

    before = await count_messages(mesh)
    runs = [
        beamline(mesh, "logs", flag, value, "--json")
        for value in HOSTILE
        for flag in ("--agent", "--conversation")
    ]
    for code, out, err in await asyncio.gather(*runs):
        assert code == 0, err
        assert json.loads(out) == []
    # the table is still there (a dropped one fails the count) and lost nothing
    assert await count_messages(mesh) >= before
    code, out, err = await beamline(mesh, "logs", "--agent", "analyst", "--kind", "reply", "--json")
    assert code == 0 and len(json.loads(out)) == 2, err


async def test_db_migrate_on_a_running_mesh_names_the_recorder_or_applies_nothing(
    start_mesh: MeshFactory,
) -> None:
    mesh = await start_mesh()

    async def storage_open() -> bool:
        await count_messages(mesh)  # answered: the recorder has opened (and migrated) it
        return True

    await wait_for(storage_open, timeout=20, what="the recorder's storage")
    code, out, err = await beamline(mesh, "db", "migrate")
    if mesh.mesh.env()["BEAMLINE_CLICKHOUSE_URL"].startswith("chdb://"):
        assert code == 2, out + err  # the recorder holds the embedded engine
        assert "open in another process" in err and "Stop the mesh" in err
    else:  # a ClickHouse server: the recorder migrated it at start
        assert code == 0 and "nothing applied" in out, err
