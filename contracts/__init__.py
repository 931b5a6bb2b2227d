"""The public wire contract of shared/CONTRACT.md as code.

This package depends on nothing else in the project: telephony teams may vendor it.
"""
