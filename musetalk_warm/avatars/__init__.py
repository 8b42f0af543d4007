"""Avatars: preparation (landmarks, parsing, masks, stabilised placements) and the on-disk cache."""
