"""Certifying a GPU/CUDA setup before the lab: doctor, quick conformance, performance snapshot, the lab's
tables, and a report with plots (run.py drives them)."""
