"""Monitoring of production inputs: `lmctl drift` (see lmctl/monitor/drift.py for the checks)."""
