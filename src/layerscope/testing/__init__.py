"""Test doubles that are not product code: tiny random-weight pipelines of every family (:mod:`.pipelines`, loaded
as ``tiny:<family>``) and sanity generators built to fail in known ways (:mod:`.sanity`, loaded as
``torch:layerscope.testing.sanity:<factory>``)."""
