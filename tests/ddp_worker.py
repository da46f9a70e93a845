"""One process of a two-process test job: runs ``run(cfg)`` for each list of overrides given as JSON in
argv[1], in order, with the process-group variables the test set (as torchrun would). Exits 1 at the first
run that raises, after printing the error."""

import json
import sys

import conftest  # noqa: F401 - the offline environment, before anything imports the hub libraries
from conftest import compose_config

from moelab.modules.training import run


def main() -> int:
    for overrides in json.loads(sys.argv[1]):
        try:
            run(compose_config(*overrides))
        except Exception as error:  # noqa: BLE001 - reported to the test through stderr and the exit status
            print(f"ddp_worker: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
