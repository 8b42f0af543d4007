"""Speech input: text-to-speech engines."""
