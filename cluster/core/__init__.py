"""The pure bottom: what the system is."""
