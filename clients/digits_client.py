"""Call the demo soup with Triton's own client: `python clients/digits_client.py --url localhost:8001`.

Sends held-out digit images to model 'digits', prints the predictions, the blend version
that answered and the accuracy on the images sent.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC address of the Tureen server")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--count", type=int, default=64, help="how many images to send in one request")
    args = parser.parse_args()

    digits = load_digits()
    pixels = digits.data[-args.count :].astype(np.float32)
    labels = digits.target[-args.count :]

    client = grpcclient.InferenceServerClient(args.url)
    metadata = client.get_model_metadata(args.model)
    print(f"model {metadata.name}, versions {list(metadata.versions)}, server live: {client.is_server_live()}")
    tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(args.model, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")])
    predicted = result.as_numpy("probabilities").argmax(axis=1)
    version = result.get_response().model_version
    print(f"predicted {predicted[:16].tolist()}{' ...' if len(predicted) > 16 else ''}")
    print(f"answered by blend version {version}; accuracy on these {len(labels)} images: {np.mean(predicted == labels):.3f}")


if __name__ == "__main__":
    main()
