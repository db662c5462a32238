"""The worker: ``trainfleet join URL`` detects, registers, claims, runs, heartbeats, reports."""
