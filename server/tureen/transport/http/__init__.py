"""HTTP transport: KServe v2 over REST with Triton's extensions, on Starlette and uvicorn.

``routes`` decodes each route, delegates to the core and encodes; ``codec`` reads and writes
inference bodies (JSON and binary tensors); ``status`` maps the error tree to HTTP codes;
``server`` binds and runs it.
"""
