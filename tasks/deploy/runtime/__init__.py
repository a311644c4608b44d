"""Serving exported folders without torch or transformers: ``predict`` (the ``Predictor``) and ``adapters`` (the
checks an adapter file must pass before it serves on an int4 base)."""
