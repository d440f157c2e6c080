"""The engines: how a run is timed."""
