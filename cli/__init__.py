"""Command-line layer of toptheta-export (installed as topthetaexport.cli)."""
