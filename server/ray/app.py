"""The Ray Serve application built from LORAPLEX_<FLAG> variables, for Serve config files and
KubeRay (`import_path: server.ray.app:app`): the same deployments `loraplex serve-ray` runs."""

from __future__ import annotations

from server.cli import build_parser
from server.ray.cli import application

app, _ = application(build_parser().parse_args(["serve-ray"]))
