"""The coordinator: the HTTP control plane (Starlette app, served by uvicorn)."""
