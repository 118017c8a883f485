"""A tiny, deterministic stand-in for a model evaluation: scores one shard.

Runs with only the standard library and no network, as an eval shard must.
"""

import argparse
import hashlib
import json
import os


def score(model: str, shard: int, shards: int, samples: int) -> dict[str, object]:
    correct = 0
    for sample in range(shard, samples * shards, shards):
        digest = hashlib.sha256(f"{model}:{sample}".encode()).digest()
        correct += digest[0] % 2
    return {
        "model": model,
        "shard": shard,
        "samples": samples,
        "accuracy": correct / samples,
        "authenticated": bool(os.environ.get("HF_TOKEN")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shard", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = score(
        os.environ.get("MODEL", "tiny"),
        args.shard,
        int(os.environ.get("SHARDS", "1")),
        int(os.environ.get("SAMPLES", "50")),
    )
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
