"""HTTP beside gRPC: one ASGI app (Starlette) on uvicorn, run inside the server's own event loop.

`app.build_http_app` assembles the routes of KServe v2 REST (`kserve.py`, Triton's generate
extension in `generate.py`), the typed pipelines (`pipelines.py`) and the OpenAI-compatible API
(`openai.py`); `listener.HttpListener` serves it. Like the gRPC adapters, every route only
translates: inference through the DataPlane, model management through the ControlPlane, errors
to HTTP statuses in `errors.py`.
"""
