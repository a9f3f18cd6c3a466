"""Benchmark harness: lcha against direct access and HAProxy on loopback.

Run ``python -m bench run SCENARIO [--quick]``; bench/RESULTS.rst records a
full run and describes each scenario.
"""
