"""The studies: how runs are driven."""
