"""The fedbell aggregator: runs rounds, averages updates, publishes models."""
