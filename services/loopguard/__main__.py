from beamline.service import run
from beamline.settings import MeshSettings
from services.loopguard.service import main

run("loopguard", main, MeshSettings().log_level)
