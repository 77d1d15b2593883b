"""The committed caches read back (latent and text rows) and each epoch's plan of global batches."""
