"""The supervisor places an agent by the shard its mailbox is stored in; that shard is
computed by nats-server's `partition` transform. Both must agree, agent by agent."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from beamline import subjects
from beamline.settings import MeshSettings


async def test_shard_of_matches_the_servers_partition_transform(nc: NATS) -> None:
    js = nc.jetstream()
    shards = MeshSettings().mailbox_shards
    names = [f"agent-{i}" for i in range(300)] + ["researcher", "analyst", "writer", "a_B-9"]
    for name in names:
        await js.publish(subjects.inbox(name), b"{}")
    stored = {}
    for seq in range(1, len(names) + 1):
        msg = await js.get_msg(subjects.STREAM_MAILBOX, seq)
        assert msg.subject is not None
        _, _, shard, agent = msg.subject.split(".")
        stored[agent] = int(shard)
    assert stored == {name: subjects.shard_of(name, shards) for name in names}
    assert len(set(stored.values())) == shards  # and they spread over every shard
