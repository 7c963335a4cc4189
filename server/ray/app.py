"""The Ray Serve application built from LORAPLEX_<FLAG> variables, for Serve config files and
KubeRay (`import_path: server.ray.app:app`): the same deployments `loraplex serve-ray` runs."""

from __future__ import annotations

import argparse

from server.ray.cli import add_flags, application

_parser = argparse.ArgumentParser(prog="loraplex serve-ray")
add_flags(_parser)
app, _, _ = application(_parser.parse_args([]))
