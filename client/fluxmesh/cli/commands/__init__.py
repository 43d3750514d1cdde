"""The `fluxmesh` commands, one module per group (see fluxmesh.cli.main for how they are mounted)."""
