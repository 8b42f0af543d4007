"""Session records: per-session folders, ordered clip appends to ``full_session.mp4``."""
