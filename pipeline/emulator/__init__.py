"""Local VideoDB-compatible API + WebSocket server for offline runs and tests."""

from pipeline.emulator.server import Emulator

__all__ = ["Emulator"]
