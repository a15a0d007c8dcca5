"""Measured speed, memory and accuracy of ToE, and the project's figures (``python -m bench.<name>``)."""
