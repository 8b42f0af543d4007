"""MuseTalk v1.5 models (UNet, VAE, Whisper) and the audio features that condition them."""
