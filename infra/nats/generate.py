"""Write infra/nats/auth.conf, the container config's NATS users, from the permission model
in shared/beamline/nats_auth.py. Run it after changing the model:

    .venv/bin/python infra/nats/generate.py

tests/unit/test_nats_auth.py fails while the checked-in file and the model differ.
"""

from __future__ import annotations

from pathlib import Path

from beamline import nats_auth

AUTH_CONF = Path(__file__).resolve().parent / "auth.conf"


def main() -> None:
    AUTH_CONF.write_text(nats_auth.render(nats_auth.default_users()))
    print(f"wrote {AUTH_CONF}")


if __name__ == "__main__":
    main()
