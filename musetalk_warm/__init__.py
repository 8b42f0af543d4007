"""musetalk-warm: a warm, persistent MuseTalk v1.5 talking-head server."""
