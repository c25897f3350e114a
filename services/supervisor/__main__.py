from beamline.service import run
from beamline.settings import MeshSettings
from services.supervisor.service import main

run("supervisor", main, MeshSettings().log_level)
