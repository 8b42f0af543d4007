"""Reading and writing media: audio uploads, decoding, H.264/AAC fragmented MP4, the session video."""
