"""pdmesh: a serving mesh for large language models with prefill/decode disaggregation."""

__version__ = "0.1.0"
