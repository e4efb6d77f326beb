"""A minimal experiment entry point: validates its config and prints what it received.

Usage: ``python config_main.py --config=CONFIG_FILE --workdir=DIR [--config.key=value]``.
"""

import json

from rlhf_jax.train.config import Field, main_from_flags

SCHEMA = {
    "learning_rate": Field(float, minimum=0.0),
    "optimizer": {"name": Field(str, choices=("adam", "sgd")), "b1": Field(float, required=False)},
}


def report(config, workdir):
    print(json.dumps({"config": config.to_dict(), "workdir": workdir}))


if __name__ == "__main__":
    main_from_flags(report, schema=SCHEMA)
