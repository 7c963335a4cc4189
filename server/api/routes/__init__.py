"""Thin routers: parse, authorize, delegate to a service, shape the reply."""
