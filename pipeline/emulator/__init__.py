"""Local VideoDB-compatible API + WebSocket server for offline runs and tests."""
