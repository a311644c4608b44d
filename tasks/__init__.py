"""Pipeline stages as plain functions: each works and tests without Prefect (flows/ wraps them as tasks)."""
