"""Mosquitto configuration and a runner for local brokers (tests, simulation)."""
