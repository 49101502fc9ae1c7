"""Triton Inference Server: model configurations generated from a build's manifest, checked against
Triton's schema and the graphs they serve (:mod:`engines.triton.config`)."""
