"""Shared helpers of the test suite: references, tolerance rule, backends, small models and checkpoints."""
