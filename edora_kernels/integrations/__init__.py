"""Bridges to adapter libraries (PEFT first)."""
