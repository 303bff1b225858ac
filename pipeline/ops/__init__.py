"""Command-line clients of a running pipeline's operator endpoint: `pipeline tap`, `pipeline top`."""
