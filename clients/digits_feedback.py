"""Labelled traffic for the demo soup: `python clients/digits_feedback.py --url localhost:8001`.

An application that learns the right answer later (a user's correction, a delayed label) sends
each request with an id, then reports the true label for that id. Tureen scores the version
that answered, which is how a canary gets promoted or rolled back. This sends digit images one
at a time, each with an id, reports every label, and prints each version's share of the
answers and the canary's standing as it goes, until the canary is decided or --requests run out.
"""

from __future__ import annotations

import argparse
import collections
import uuid

import numpy as np
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits
from tureen_client import SoupClient, read_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the Tureen server")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--requests", type=int, default=3000, help="labelled requests to send at most")
    parser.add_argument("--token-file", help="the inference token, when the server requires one")
    args = parser.parse_args()

    digits = load_digits()
    token = read_token(args.token_file, env="TUREEN_INFERENCE_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else None
    client = grpcclient.InferenceServerClient(args.url)
    answered: collections.Counter[str] = collections.Counter()
    with SoupClient(args.url, token=token) as soups:
        canary = int(soups.status(args.model)["models"][0].get("canary_version") or 0)
        print(f"canary version: {canary or 'none'}")
        rng = np.random.default_rng(0)
        for i in range(1, args.requests + 1):
            row = int(rng.integers(len(digits.target)))
            tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
            tensor.set_data_from_numpy(digits.data[row : row + 1].astype(np.float32))
            request_id = uuid.uuid4().hex
            result = client.infer(args.model, [tensor], request_id=request_id, headers=headers)
            answered[result.get_response().model_version] += 1
            soups.feedback(args.model, request_id, int(digits.target[row]))
            if i % 100 == 0 or i == args.requests:
                status = soups.status(args.model)["models"][0]
                online = ", ".join(
                    f"v{v} {float(o['accuracy']):.3f} ({o['samples']})" for v, o in sorted(status.get("online", {}).items())
                )
                print(f"{i:5d} requests; answered by {dict(answered)}; online accuracy {online}")
                print(f"      canary: {status.get('canary_note', '')}")
                if canary and int(status.get("canary_version") or 0) != canary:
                    print(f"decided: active version {status['active_version']}")
                    break
    client.close()


if __name__ == "__main__":
    main()
