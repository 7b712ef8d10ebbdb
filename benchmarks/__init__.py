"""Benchmarks: the runtime's backends timed side by side, plus the export's own cost."""
