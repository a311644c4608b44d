"""Prefect flows: the pipeline's DAGs, composed from the plain functions in tasks/."""
import os

# Defaults set before Prefect is imported (a user's environment wins):
# - the temporary local Prefect server otherwise tries to send usage telemetry (and logs errors offline);
# - the stages' own loggers (tasks.*) and the Hugging Face libraries' go to the Prefect run logs too;
# - the temporary server gets 2 minutes to start, not 20 s: creating and migrating a fresh SQLite database can
#   take longer than 20 s on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,transformers,peft,trl,datasets")
