"""Metrics free of Ray: reward models (`reward`) and policy win rates (`winrates`)."""
