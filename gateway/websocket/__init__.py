"""WebSocket upgrades: authenticated handshakes, the frame relay, the registry of open sockets."""
