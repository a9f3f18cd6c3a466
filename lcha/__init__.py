"""Slot-aware load balancer for llama.cpp llama-server backends."""

__version__ = "0.1.0"
