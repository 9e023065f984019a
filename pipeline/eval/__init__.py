"""The evaluation stage: metrics and benchmark suites for registered adapters."""
