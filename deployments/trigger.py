"""Trigger a deployment's run from the command line and wait for its final state.

    deployments/trigger.sh finetune/on-demand [--config PATH] [--set dotted.key=value ...] [--no-wait]
    deployments/trigger.sh sweep/sweep --set n_trials=8

The run's ``cfg`` (the sweep's ``spec``) is the deployment's default with the ``--set`` overrides applied (or
``--config`` with the overrides), validated by ``configs/schema.py`` before anything is sent. Exits 0 when the run
completed, 1 otherwise. Talks to the server at ``PREFECT_API_URL`` (``trigger.sh`` sets the local default
through ``env.sh``); without it, it stops instead of starting a temporary server of its own.
"""
from __future__ import annotations

import argparse
import os
import sys

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from configs.schema import (ConfigError, apply_overrides, load_config, load_sweep, sweep_baseline, validate_config,
                            validate_sweep)


def run_parameters(deployment: str, config: str | None, overrides: list[str]) -> dict:
    """The parameters of one run: ``{"cfg": config}`` from ``config`` (a YAML file) or the deployment's default
    ``cfg``, plus overrides; for the sweep deployment (parameter ``spec``) ``{"spec": sweep config}`` likewise,
    the overrides naming the sweep's own keys (``n_trials=8``, ``finetune.train.learning_rate=1e-3``).

    Raises:
        ConfigError: a bad file, key or value (named by its dotted path).
    """
    with get_client(sync_client=True) as client:
        defaults = client.read_deployment_by_name(deployment).parameters
    source = config or f"deployment {deployment}"
    if "spec" in defaults:
        spec = load_sweep(config, overrides)[0] if config else \
            validate_sweep(apply_overrides(defaults["spec"], overrides), source)
        sweep_baseline(spec, source)  # the finetune config it names must load and validate, here and now
        return {"spec": spec.model_dump(mode="json")}
    cfg = load_config(config, overrides) if config else \
        validate_config(apply_overrides(defaults.get("cfg", {}), overrides), source)
    return {"cfg": cfg.model_dump(mode="json")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deployments/trigger.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("deployment", help="<flow name>/<deployment name>, e.g. finetune/on-demand")
    p.add_argument("--config", help="a YAML config instead of the deployment's defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-wait", action="store_true", help="return once the run is created")
    args = p.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set (use deployments/trigger.sh, or export it)", file=sys.stderr)
        return 1
    try:
        parameters = run_parameters(args.deployment, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    run = run_deployment(args.deployment, parameters=parameters, timeout=0 if args.no_wait else None)
    print(f"flow run {run.name} ({run.id}): {run.state.name if run.state else 'submitted'}")
    return 0 if args.no_wait or (run.state and run.state.is_completed()) else 1


if __name__ == "__main__":
    sys.exit(main())
