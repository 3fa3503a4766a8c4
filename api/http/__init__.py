"""The HTTP edge: FastAPI routes per resource, browser mode, audit, metrics and the error table."""
