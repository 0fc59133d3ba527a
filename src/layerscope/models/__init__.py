"""Adapters: one file per model family behind the :class:`~layerscope.models.base.Generator` interface."""
