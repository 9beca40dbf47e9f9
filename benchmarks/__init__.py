"""Scripts that measure speed and memory and print Markdown tables (``python -m benchmarks.NAME``),
not tests. docs/performance.md holds their results with the date, the machine and the command."""
