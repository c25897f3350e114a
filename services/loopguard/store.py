"""The loop guard's state in KV: one key (`state`) in bucket `BL_LOOPGUARD`, written by
compare-and-set after every change and before the loop guard acts on it
(`beamline.kvrecord`): ladders, escalations, and commands not yet acknowledged."""

from __future__ import annotations

from nats.js.kv import KeyValue

from beamline import subjects
from beamline.kvrecord import KVRecord
from services.loopguard.ladder import GuardState

KEY = "state"


class GuardStore(KVRecord[GuardState]):
    def __init__(self, kv: KeyValue) -> None:
        super().__init__(
            kv,
            subjects.BUCKET_LOOPGUARD,
            KEY,
            GuardState,
            what="the loop guard's state",
            forgets="forgets every ladder and open escalation",
            service="loopguard",
        )
