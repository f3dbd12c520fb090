"""The pieces of tools/convergence.py: suite files (suite.py), runs through deepy.py (runner.py), the
step-by-step comparison (compare.py), the PNG (plot.py), report.md and results.json (report.py)."""
