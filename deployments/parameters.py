"""Deployment parameters from the TOML files in ``configs/``.

Prefect cannot read fedtune's TOML, so ``deployments/prefect.yaml`` carries each deployment's
configuration as a copy; ``tests/test_deployments.py`` holds the copy equal to
:func:`deployment_parameters` of its TOML file. After editing a TOML file, print the block to
paste into ``prefect.yaml`` with::

    python -m fedtune.deployments.parameters configs/nightly.toml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedtune.fl.config import ConfigError, load_config


def deployment_parameters(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The ``parameters`` of a ``federated_training`` deployment that runs ``path``.

    Only the keys the file (or an override) sets are kept, validated and in JSON form: a
    deployment run then gets the code's defaults for the rest, exactly as
    ``fedtune run -c path`` does, and the copy in ``prefect.yaml`` stays short enough to read.
    """
    config = load_config(path, overrides)
    return {"config": config.model_dump(mode="json", exclude_unset=True)}


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(
        prog="python -m fedtune.deployments.parameters",
        description="Print a config file as the `parameters:` block of deployments/prefect.yaml.",
    )
    parser.add_argument("config", metavar="FILE.toml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE"
    )
    args = parser.parse_args(argv)
    try:
        parameters = deployment_parameters(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    block = yaml.safe_dump({"parameters": parameters}, sort_keys=False)
    # Indented as under a `deployments:` entry of prefect.yaml, to paste over the old block.
    print("".join(f"    {line}" for line in block.splitlines(keepends=True)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
