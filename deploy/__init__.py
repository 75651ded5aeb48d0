"""Provisioning and installation of a fedbell site (broker, aggregator, doorbells)."""
