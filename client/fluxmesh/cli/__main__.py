from fluxmesh.cli.main import app

app(prog_name="fluxmesh")
