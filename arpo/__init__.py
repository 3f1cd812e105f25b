"""arpo: a compact trainer and decoder for ARPO (Agentic Reinforced Policy Optimization)."""
__version__ = "0.1.0"
