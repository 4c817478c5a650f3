"""The training recipe and its step functions."""
