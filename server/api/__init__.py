"""HTTP API: the FastAPI app factory and thin routers."""
