"""fedbell's main job on one machine: a broker, an aggregator and N doorbells, for real."""
