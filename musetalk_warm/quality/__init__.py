"""Lip-sync quality: SyncNet scores and mouth-opening statistics of rendered clips."""
