"""What builds an export target's files: the GenAI model builder, the int4 base, OpenVINO IRs, QNN QDQ models."""


class BuildError(RuntimeError):
    """An export target cannot be built with these settings (a rung of a ladder: ``tasks.deploy.export.climb_ladder``
    records it as failed, with this message, and tries the next)."""
