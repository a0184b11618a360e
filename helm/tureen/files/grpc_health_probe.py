"""Check the standard gRPC health service over TLS; exit 0 only when it answers SERVING.

The chart runs this as an exec probe when tls.enabled: the kubelet's own gRPC probe speaks
plaintext only. It needs Python, grpcio and grpcio-health-checking, which the Tureen image has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help='health service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--ca", action="append", default=[], help="CA certificate(s) to trust (PEM); missing files are skipped")
    parser.add_argument("--server-name", help="the name the server certificate must carry")
    parser.add_argument("--cert", help="client certificate (PEM), for servers that require one (mTLS)")
    parser.add_argument("--key", help="the client certificate's private key (PEM)")
    args = parser.parse_args()

    roots = b"".join(Path(path).read_bytes() for path in args.ca if Path(path).is_file()) or None
    pair = (Path(args.key).read_bytes(), Path(args.cert).read_bytes()) if args.cert and args.key else (None, None)
    credentials = grpc.ssl_channel_credentials(roots, *pair)
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    with grpc.secure_channel(f"{args.host}:{args.port}", credentials, options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"service {args.service!r}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
