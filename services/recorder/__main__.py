"""`python -m services.recorder`: record every recorded stream into ClickHouse."""

from __future__ import annotations

import os

from beamline.service import run
from services.recorder.service import SERVICE, main

if __name__ == "__main__":
    run(SERVICE, main, os.environ.get("BEAMLINE_LOG_LEVEL", "INFO"))
