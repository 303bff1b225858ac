"""Persistent state under the pipeline's state_dir (spools, ...)."""
