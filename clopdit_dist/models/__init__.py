"""Models: the count autoencoder, the text and cell towers (CLOP), the DiT and flow matching."""
