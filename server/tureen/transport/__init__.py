"""Transports, side by side over the one data plane (``tureen.core.engine``).

``grpc``: KServe v2 (Triton's ``grpc_service.proto``), Tureen's admin and feedback services,
health and reflection. ``http``: KServe v2 over HTTP/REST. Each decodes its wire format,
delegates to the core and encodes the result, and maps the one error tree to its own status
codes in one place; neither imports the other.
"""
