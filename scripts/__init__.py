"""Command-line tools: benchmark, demo data (run as ``python -m scripts.<tool>``)."""
