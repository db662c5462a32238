"""The trainfleet command line."""
