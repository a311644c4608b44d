"""The pipeline's work as plain functions: each stage works and tests without Prefect (``flows/`` wraps them as
tasks). By role, in layers that import only downwards (``[tool.importlinter]`` in pyproject.toml):

- ``tasks.stages``: the stages of the DAG (ingest, split, validate, train, evaluate, merge, report, promote, sweep
  trials, hub push, the copyable run folder);
- ``tasks.deploy``: everything an export is: the export stage and its gate on top, the model builders, the file
  formats, and the torch-free runtime that serves every exported folder at the bottom;
- ``tasks.base_model``: the base model resolved, converted and loaded with the security defaults;
- ``tasks.common``: helpers every layer shares (atomic files and manifests, the chat format, the metric registry,
  the completion-only loss, padding-free batches).
"""
