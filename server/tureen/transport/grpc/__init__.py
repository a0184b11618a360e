"""gRPC transport: the KServe v2 servicer, codec, error mapping, health, reflection, assembly.

The inference service's messages are Triton's ``grpc_service.proto`` (KServe v2 plus Triton's
extensions such as ModelConfig and ModelStatistics), imported from the modules tritonclient
ships, so the wire format is the one ``tritonclient.grpc`` and ``perf_analyzer`` speak.
"""
