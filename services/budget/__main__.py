from beamline.service import run
from beamline.settings import MeshSettings
from services.budget.service import main

run("budget", main, MeshSettings().log_level)
