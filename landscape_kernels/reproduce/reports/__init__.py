"""Figures and ``report.md`` of the reproduce jobs (``common`` holds what every report shares)."""
