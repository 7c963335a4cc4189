"""The web console's static files (served by server.api.routes.console)."""
