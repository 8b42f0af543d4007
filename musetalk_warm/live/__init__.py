"""Live sessions: a clock-paced avatar stream per conversation on one shared frame scheduler."""
