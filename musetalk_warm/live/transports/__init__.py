"""Transports: ways a viewer receives a live session (WebRTC, fMP4 over WebSocket).

They only read a session's subscription; the session clock paces everything.
"""
