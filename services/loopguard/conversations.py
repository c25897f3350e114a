"""Each conversation's `Watch`, in memory for the latest ones (least recently used go
first), rebuilt from the journal for the others: the state is the trace, so a restarted
loop guard, or one that evicted a conversation, reaches the same counts as one that never
stopped."""

from __future__ import annotations

from collections import OrderedDict

from nats.js.client import JetStreamContext

from beamline import subjects
from beamline.guard import LoopGuard
from beamline.journal import read_entries
from services.loopguard.detector import Watch, observe
from services.loopguard.ladder import AgentLadder


class Conversations:
    def __init__(self, js: JetStreamContext, size: int) -> None:
        self.js, self.size = js, size
        self._watches: OrderedDict[tuple[str, str], Watch] = OrderedDict()
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._watches)

    async def watch(
        self,
        agent: str,
        conversation: str,
        seq: int,
        guard: LoopGuard,
        ladder: AgentLadder,
        first: bool = False,
    ) -> Watch:
        """The watch of one agent's conversation, as of just before journal entry `seq`;
        `first`: that entry is the conversation's first (nothing earlier to read)."""
        key = (agent, conversation)
        found = self._watches.get(key)
        if found is not None:
            self._watches.move_to_end(key)
            return found
        watch = Watch()
        if not first:
            subject = subjects.journal(agent, conversation)
            for entry_seq, entry in await read_entries(self.js, subject, below=seq):
                if not ladder.skipped(entry_seq):
                    observe(guard, watch, entry)  # loops found again were acted on back then
            self.replayed += 1
        self._watches[key] = watch
        while len(self._watches) > self.size:
            self._watches.popitem(last=False)
        return watch
