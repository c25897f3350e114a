"""`python -m services.agent`: run an agent host."""

from beamline.service import run
from beamline.settings import MeshSettings
from services.agent.service import main

if __name__ == "__main__":
    run("agent", main, MeshSettings().log_level)
