"""Rendering: mouth renderers (MuseTalk, lite), the accelerator engine, paste-back and the runtime."""
